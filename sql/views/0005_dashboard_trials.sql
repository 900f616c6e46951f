-- dashboard_trials as of revision 0005: as revision 0004 defined it, plus each trial's calibration time
-- (what a method spent on the data before training). As of 0004: beside the validation objective (what the search chose
-- by) each trial carries the same metric on the test split at its kept checkpoint, signed like
-- `score` in `test_score`; NULL for trials of stores from before test splits. The other views stay
-- as revisions 0002 and 0003 defined them.

CREATE VIEW dashboard_trials AS
SELECT
    t.trial_id AS trial_id,
    e.name AS experiment,
    e.metric AS metric,
    e.mode AS mode,
    t.task AS task,
    COALESCE(t.domain, '(none)') AS domain,
    t.dataset AS dataset,
    t.model AS model,
    t.method AS method,
    t.seed AS seed,
    t.status AS status,
    CAST(t.hparams AS TEXT) AS hparams,
    t.method || ' ' || CAST(t.hparams AS TEXT) AS config,
    t.objective AS objective,
    CASE WHEN e.mode = 'min' THEN -t.objective ELSE t.objective END AS score,
    t.test_objective AS test_objective,
    CASE WHEN e.mode = 'min' THEN -t.test_objective ELSE t.test_objective END AS test_score,
    CASE
        WHEN t.status IN ('COMPLETED', 'EARLY_STOPPED') AND t.objective IS NOT NULL THEN 1
        ELSE 0
    END AS ranked,
    t.trainable_params AS trainable_params,
    t.total_params AS total_params,
    t.trainable_pct AS trainable_pct,
    t.adapter_bytes AS adapter_bytes,
    t.peak_memory_bytes AS peak_memory_bytes,
    t.train_seconds AS train_seconds,
    t.calibration_seconds AS calibration_seconds,
    t.samples_per_second AS samples_per_second,
    t.steps AS steps,
    t.error AS error,
    t.mlflow_run_id AS mlflow_run_id,
    t.node AS node,
    t.started_at AS started_at,
    t.finished_at AS finished_at
FROM trials t
JOIN experiments e ON e.id = t.experiment_id;
