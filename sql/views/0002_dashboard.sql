-- Views the dashboard reads (revision 0002). The dashboard queries these, never the tables, so
-- the tables may change behind them. Portable SQL only: it runs unchanged on SQLite and
-- PostgreSQL. A change to a view is a new revision with its own file; this one stays as it is.

-- One row per experiment.
CREATE VIEW dashboard_experiments AS
SELECT
    e.name AS experiment,
    e.status AS status,
    e.metric AS metric,
    e.mode AS mode,
    e.code_version AS code_version,
    e.created_at AS created_at,
    e.updated_at AS updated_at
FROM experiments e;

-- One row per trial with its experiment's metric and mode folded in, plus what every page needs:
--   config: method and hyperparameters as one text key, so the seeds of a configuration group
--           together (hparams holds only the method's own hyperparameters; the seed is apart);
--   score:  the objective signed so that higher is always better (negated for mode 'min');
--   ranked: 1 for a trial that counts in a comparison (finished, with a finite objective).
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
    t.samples_per_second AS samples_per_second,
    t.steps AS steps,
    t.error AS error,
    t.mlflow_run_id AS mlflow_run_id,
    t.node AS node,
    t.started_at AS started_at,
    t.finished_at AS finished_at
FROM trials t
JOIN experiments e ON e.id = t.experiment_id;

-- Metric curves: one point per (trial, step, metric name); value NULL where it was NaN/inf.
CREATE VIEW dashboard_curves AS
SELECT
    m.trial_id AS trial_id,
    m.step AS step,
    m.name AS name,
    m.value AS value
FROM trial_metrics m;
