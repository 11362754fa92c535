"""The database schema as forward migrations. Table and column names are the public SQL
interface (users and the README's recipes query them): extend them, do not rename them."""

# Each migration moves the schema from version i to i + 1. Append, never edit: a database
# in the field at version i runs every statement after it, in one transaction.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE runs (
            run_id VARCHAR PRIMARY KEY,
            config_json VARCHAR NOT NULL,
            config_sha256 VARCHAR NOT NULL,
            seed BIGINT NOT NULL,
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
        )""",
        """CREATE TABLE rounds (
            run_id VARCHAR NOT NULL,
            round INTEGER NOT NULL,
            model_id VARCHAR NOT NULL,
            status VARCHAR NOT NULL DEFAULT 'started',
            pair_policy_json VARCHAR,
            snapshot_dir VARCHAR,
            started_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
            finished_at TIMESTAMP,
            PRIMARY KEY (run_id, round)
        )""",
        """CREATE TABLE models (
            model_id VARCHAR PRIMARY KEY,
            parent_model_id VARCHAR,
            path VARCHAR NOT NULL,
            sha256 VARCHAR NOT NULL,
            kind VARCHAR NOT NULL DEFAULT 'policy',
            run_id VARCHAR,
            round INTEGER,
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
        )""",
        """CREATE TABLE templates (
            template_id VARCHAR PRIMARY KEY,
            name VARCHAR NOT NULL,
            sha256 VARCHAR NOT NULL,
            path VARCHAR NOT NULL,
            text VARCHAR NOT NULL,
            metadata_json VARCHAR NOT NULL,
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
        )""",
        """CREATE TABLE prompts (
            run_id VARCHAR NOT NULL,
            prompt_id VARCHAR NOT NULL,
            round INTEGER NOT NULL,
            source VARCHAR NOT NULL,
            split VARCHAR NOT NULL DEFAULT 'train',
            text VARCHAR NOT NULL,
            messages_json VARCHAR NOT NULL,
            generation_id VARCHAR,
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
            PRIMARY KEY (run_id, prompt_id)
        )""",
        """CREATE TABLE generations (
            generation_id VARCHAR PRIMARY KEY,
            run_id VARCHAR NOT NULL,
            round INTEGER NOT NULL,
            method VARCHAR NOT NULL,
            prompt_id VARCHAR NOT NULL,
            model_id VARCHAR NOT NULL,
            template_id VARCHAR,
            role VARCHAR NOT NULL,
            sample_idx INTEGER NOT NULL,
            parent_generation_id VARCHAR,
            text VARCHAR NOT NULL,
            n_tokens INTEGER,
            finish_reason VARCHAR,
            sampling_json VARCHAR NOT NULL,
            seed BIGINT NOT NULL,
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
        )""",
        # score is NULL when the judge output did not parse: never a sentinel value.
        """CREATE TABLE judgments (
            judgment_id VARCHAR PRIMARY KEY,
            run_id VARCHAR NOT NULL,
            round INTEGER NOT NULL,
            method VARCHAR NOT NULL,
            generation_id VARCHAR NOT NULL,
            sample_idx INTEGER NOT NULL,
            model_id VARCHAR NOT NULL,
            template_id VARCHAR NOT NULL,
            raw_output VARCHAR NOT NULL,
            score DOUBLE,
            parse_status VARCHAR NOT NULL,
            sampling_json VARCHAR NOT NULL,
            seed BIGINT NOT NULL,
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
        )""",
        # Pairwise AI labels (RLCD-Rescore, RL-CAI feedback, evaluation): prob_a is the
        # normalised probability that answer A is better, in the order asked.
        """CREATE TABLE comparisons (
            comparison_id VARCHAR PRIMARY KEY,
            run_id VARCHAR NOT NULL,
            round INTEGER NOT NULL,
            method VARCHAR NOT NULL,
            prompt_id VARCHAR NOT NULL,
            generation_a_id VARCHAR NOT NULL,
            generation_b_id VARCHAR NOT NULL,
            model_id VARCHAR NOT NULL,
            template_id VARCHAR NOT NULL,
            principle_id VARCHAR,
            prob_a DOUBLE,
            raw_output VARCHAR,
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
        )""",
        """CREATE TABLE critiques (
            critique_id VARCHAR PRIMARY KEY,
            run_id VARCHAR NOT NULL,
            round INTEGER NOT NULL,
            prompt_id VARCHAR NOT NULL,
            step INTEGER NOT NULL,
            principle_id VARCHAR NOT NULL,
            input_generation_id VARCHAR NOT NULL,
            critique VARCHAR NOT NULL,
            revision_generation_id VARCHAR,
            model_id VARCHAR NOT NULL,
            template_id VARCHAR NOT NULL,
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
        )""",
        """CREATE TABLE pairs (
            pair_id VARCHAR PRIMARY KEY,
            run_id VARCHAR NOT NULL,
            round INTEGER NOT NULL,
            method VARCHAR NOT NULL,
            prompt_id VARCHAR NOT NULL,
            chosen_generation_id VARCHAR NOT NULL,
            rejected_generation_id VARCHAR NOT NULL,
            chosen_score DOUBLE,
            rejected_score DOUBLE,
            margin DOUBLE,
            soft_label DOUBLE,
            flagged BOOLEAN NOT NULL DEFAULT false,
            flag_reason VARCHAR,
            model_id VARCHAR NOT NULL,
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
        )""",
        # Rejections are data: every dropped candidate, tie or failed parse, with its reason.
        """CREATE TABLE discards (
            run_id VARCHAR NOT NULL,
            round INTEGER NOT NULL,
            method VARCHAR NOT NULL,
            stage VARCHAR NOT NULL,
            item_id VARCHAR NOT NULL,
            reason VARCHAR NOT NULL,
            detail VARCHAR,
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
            PRIMARY KEY (run_id, round, method, stage, item_id, reason)
        )""",
        """CREATE TABLE training_runs (
            training_run_id VARCHAR PRIMARY KEY,
            run_id VARCHAR NOT NULL,
            round INTEGER NOT NULL,
            kind VARCHAR NOT NULL,
            base_model_id VARCHAR NOT NULL,
            reference_model_id VARCHAR,
            output_model_id VARCHAR,
            config_json VARCHAR NOT NULL,
            metrics_json VARCHAR,
            status VARCHAR NOT NULL,
            started_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
            finished_at TIMESTAMP
        )""",
        """CREATE TABLE evaluations (
            evaluation_id VARCHAR PRIMARY KEY,
            run_id VARCHAR NOT NULL,
            round INTEGER NOT NULL,
            metric VARCHAR NOT NULL,
            method VARCHAR,
            value DOUBLE,
            details_json VARCHAR,
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
        )""",
        """CREATE TABLE stage_metrics (
            run_id VARCHAR NOT NULL,
            round INTEGER NOT NULL,
            stage VARCHAR NOT NULL,
            batch INTEGER NOT NULL,
            n_items INTEGER NOT NULL,
            wall_s DOUBLE NOT NULL,
            prompt_tokens BIGINT,
            completion_tokens BIGINT,
            tokens_per_s DOUBLE,
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
            PRIMARY KEY (run_id, round, stage, batch)
        )""",
        """CREATE VIEW pair_texts AS
        SELECT p.pair_id, p.run_id, p.round, p.method, p.prompt_id,
               pr.text AS prompt, c.text AS chosen, r.text AS rejected,
               p.chosen_score, p.rejected_score, p.margin, p.soft_label,
               p.flagged, p.flag_reason
        FROM pairs p
        JOIN prompts pr ON pr.run_id = p.run_id AND pr.prompt_id = p.prompt_id
        JOIN generations c ON c.generation_id = p.chosen_generation_id
        JOIN generations r ON r.generation_id = p.rejected_generation_id""",
    ],
    # v2: method provenance (RLCD descriptors, CAI principles) on generations, the pair's
    # variant within its method, prompt tasks, and CAI's SFT rows.
    [
        "DROP VIEW pair_texts",
        "ALTER TABLE generations ADD COLUMN meta_json VARCHAR",
        "ALTER TABLE pairs ADD COLUMN variant VARCHAR",
        "ALTER TABLE prompts ADD COLUMN task VARCHAR",
        "ALTER TABLE comparisons ADD COLUMN meta_json VARCHAR",
        """CREATE TABLE sft_examples (
            sft_id VARCHAR PRIMARY KEY,
            run_id VARCHAR NOT NULL,
            round INTEGER NOT NULL,
            method VARCHAR NOT NULL,
            prompt_id VARCHAR NOT NULL,
            generation_id VARCHAR NOT NULL,
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
        )""",
        """CREATE VIEW pair_texts AS
        SELECT p.pair_id, p.run_id, p.round, p.method, p.variant, p.prompt_id,
               pr.text AS prompt, c.text AS chosen, r.text AS rejected,
               p.chosen_score, p.rejected_score, p.margin, p.soft_label,
               p.flagged, p.flag_reason, p.model_id
        FROM pairs p
        JOIN prompts pr ON pr.run_id = p.run_id AND pr.prompt_id = p.prompt_id
        JOIN generations c ON c.generation_id = p.chosen_generation_id
        JOIN generations r ON r.generation_id = p.rejected_generation_id""",
        # Self-Rewarding's per-candidate score: the mean and variance of the valid samples.
        """CREATE VIEW candidate_scores AS
        SELECT generation_id, run_id, round, method, template_id,
               count(*) AS samples, count(score) AS valid,
               avg(score) AS mean_score, var_pop(score) AS score_variance
        FROM judgments
        GROUP BY ALL""",
        """CREATE VIEW sft_texts AS
        SELECT s.sft_id, s.run_id, s.round, s.method, s.prompt_id, pr.messages_json,
               pr.text AS prompt, g.text AS completion
        FROM sft_examples s
        JOIN prompts pr ON pr.run_id = s.run_id AND pr.prompt_id = s.prompt_id
        JOIN generations g ON g.generation_id = s.generation_id""",
    ],
    # v3: time a task spent before its stage's work (engine start), so a round's wall time
    # splits into stages, set-up and orchestration.
    [
        "ALTER TABLE stage_metrics ADD COLUMN setup_s DOUBLE",
    ],
    # v4: judgments from any judge kind: `judge_id` names what judged (a template, a reward
    # model, a function); template, model and raw output are NULL where a kind has none.
    [
        "DROP VIEW candidate_scores",
        "ALTER TABLE judgments ADD COLUMN judge_id VARCHAR",
        "UPDATE judgments SET judge_id = template_id",
        "ALTER TABLE judgments ALTER COLUMN template_id DROP NOT NULL",
        "ALTER TABLE judgments ALTER COLUMN model_id DROP NOT NULL",
        "ALTER TABLE judgments ALTER COLUMN raw_output DROP NOT NULL",
        """CREATE VIEW candidate_scores AS
        SELECT generation_id, run_id, round, method, judge_id, template_id,
               count(*) AS samples, count(score) AS valid,
               avg(score) AS mean_score, var_pop(score) AS score_variance
        FROM judgments
        GROUP BY ALL""",
    ],
    # v5: a round's plan (batches per stage, the process running it), so `prefloop
    # status` can say how far a running round is.
    [
        "ALTER TABLE rounds ADD COLUMN plan_json VARCHAR",
    ],
    # v6: a round trains several steps in order (`training.steps`); `step` is the place
    # of a training run in its round's list (earlier runs were their round's only step).
    [
        "ALTER TABLE training_runs ADD COLUMN step INTEGER",
        "UPDATE training_runs SET step = 0",
    ],
    # v7: per server of an engine with several (engine.base_url as a list), what each did
    # in the stage: requests, failures, completion tokens and tokens/s.
    [
        "ALTER TABLE stage_metrics ADD COLUMN servers_json VARCHAR",
    ],
    # v8: a model named by its Hugging Face Hub id keeps the repo and the commit of the
    # snapshot it resolved to (NULL for a local directory).
    [
        "ALTER TABLE models ADD COLUMN repo VARCHAR",
        "ALTER TABLE models ADD COLUMN revision VARCHAR",
    ],
    # v9: the prompts each round drew (what its methods answer and an online RL step
    # trains on), and online RL's rollouts: a generation's `train_step` is the optimizer
    # step that trained on it (NULL for every other generation); `rollouts` shows each with
    # its prompt and reward.
    [
        """CREATE TABLE round_prompts (
            run_id VARCHAR NOT NULL,
            round INTEGER NOT NULL,
            prompt_id VARCHAR NOT NULL,
            PRIMARY KEY (run_id, round, prompt_id)
        )""",
        "ALTER TABLE generations ADD COLUMN train_step INTEGER",
        """CREATE VIEW rollouts AS
        SELECT g.run_id, g.round, g.method AS kind, g.role AS phase, g.train_step AS step,
               g.prompt_id, pr.text AS prompt, g.sample_idx, g.text AS completion,
               g.n_tokens, g.finish_reason, j.score AS reward, j.parse_status,
               j.judge_id, g.model_id, g.generation_id
        FROM generations g
        JOIN prompts pr ON pr.run_id = g.run_id AND pr.prompt_id = g.prompt_id
        LEFT JOIN judgments j ON j.generation_id = g.generation_id
        WHERE g.train_step IS NOT NULL""",
    ],
]

SCHEMA_VERSION = len(MIGRATIONS)
