-- dashboard_curves as of revision 0003: a trial is named by its experiment and its trial id,
-- so each point carries both. The other views stay as revision 0002 defined them.

-- Metric curves: one point per (experiment, trial, step, metric name); value NULL where it was NaN/inf.
CREATE VIEW dashboard_curves AS
SELECT
    e.name AS experiment,
    m.trial_id AS trial_id,
    m.step AS step,
    m.name AS name,
    m.value AS value
FROM trial_metrics m
JOIN experiments e ON e.id = m.experiment_id;
