"""Every experiment file (configs/experiment/**.yaml) composes, passes check_config and trains one
fast_dev_run step through the real run path, so a new or edited experiment is tested with no test edits.

Only data sizes are shrunk (generated ListOps and synthetic translation sets); what an experiment is
about (attention, model, optim, sequence lengths, vocab size) runs as configured, which the test checks.
"""

from pathlib import Path

import pytest

from efficient_attn_tasks.config.checks import CONFIG_DIR, check_config
from efficient_attn_tasks.run.fit import run
from tests.helpers import QUIET, SHARED_DATA, config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

EXPERIMENTS = sorted(p.relative_to(Path(CONFIG_DIR) / "experiment").with_suffix("").as_posix()
                     for p in (Path(CONFIG_DIR) / "experiment").rglob("*.yaml"))

COMPOSE_ONLY = {  # composed and checked, not trained here; why:
    "wmt14_base": "needs the HF `datasets` package and the network (corpus wmt14 de-en), and a GPU",
    "lra/listops_full": "d_model=512, 4 layers, sequences up to 2000 at batch 32 in bf16-mixed: a GPU job",
    "performer/mt_convert": "starts from performer/mt_equal's trained softmax runs (init_from), which a test has not",
}

SMALL_DATA = {  # data-size keys only, by task (and translation source)
    "listops": ["task.train_size=32", "task.val_size=16", "task.test_size=16"],
    "synthetic": ["task.synthetic_sizes=[64,16,16]"],
    "mqar": ["task.train_size=64", "task.val_size=16", "task.test_size=16"],
}
RUN = ["logger=none", "test=false", "threads=1", "++trainer.fast_dev_run=true", *QUIET]
UNCHANGED = ("attention", "model", "optim")  # what an experiment is about: the test must not touch it


def experiment(name: str, *overrides: str):
    return config(f"experiment={name}", *overrides)


def small_data(cfg) -> list[str]:
    """Overrides shrinking the generated data of a composed experiment; nothing else."""
    if cfg.task.name in ("listops", "mqar"):
        return SMALL_DATA[cfg.task.name]
    if cfg.task.name == "translation" and cfg.task.source == "synthetic":
        return SMALL_DATA["synthetic"]
    return []  # multi30k, tinyshakespeare: fixed files, read as they are


def test_experiments_are_discovered_in_subdirectories():
    assert {"quickstart", "sqrt_dk", "table3/A_heads1", "performer/mt_m16", "lra/lm"} <= set(EXPERIMENTS)
    assert set(COMPOSE_ONLY) <= set(EXPERIMENTS), "a COMPOSE_ONLY entry names no experiment file"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_checks_and_runs_one_step(tmp_path, name):
    cfg = experiment(name)
    check_config(cfg)
    if name in COMPOSE_ONLY:
        return  # reason in COMPOSE_ONLY
    if cfg.task.name == "lm" or (cfg.task.name == "translation" and cfg.task.source == "multi30k"):
        if not SHARED_DATA.exists():
            pytest.skip("needs ../shared/data")
    run_cfg = experiment(name, *RUN, *small_data(cfg))
    for section in UNCHANGED:
        assert run_cfg[section] == cfg[section], f"the test changed {section} of experiment {name}"
    assert run_cfg.task.get("vocab_size") == cfg.task.get("vocab_size")
    record = run(run_cfg, tmp_path)
    assert record.steps == 1 and record.name == cfg.name and record.attention == cfg.attention.name
    assert record.metrics.val_last, f"{name}: no validation metrics after the fast_dev_run step"
    assert (tmp_path / "results.json").exists()


# ----------------------------------------------------------------------------- per-attention settings of an experiment
EXPERIMENT_ATTENTION = sorted(p.relative_to(Path(CONFIG_DIR) / "experiment_attention").with_suffix("").as_posix()
                              for p in (Path(CONFIG_DIR) / "experiment_attention").rglob("*.yaml"))
ATTENTION_CONFIGS = sorted(p.stem for p in (Path(CONFIG_DIR) / "attention").glob("*.yaml"))


def test_every_experiment_attention_file_names_an_experiment_and_an_attention():
    """train.yaml loads experiment_attention/<experiment>/<attention>.yaml as *optional*: a misspelt
    file would be skipped in silence, so each must name an existing experiment and attention config."""
    assert EXPERIMENT_ATTENTION
    for entry in EXPERIMENT_ATTENTION:
        name, attention = entry.rsplit("/", 1)
        assert name in EXPERIMENTS and attention in ATTENTION_CONFIGS, entry


@pytest.mark.parametrize("attention", ATTENTION_CONFIGS)
def test_quickstart_gives_favor_fewer_features_and_leaves_other_attentions_alone(attention):
    """Its ~12-token sequences: favor configs at the default m = 256 get m = 64 (the why is in
    configs/experiment/quickstart.yaml); every other attention, favor_m16 / favor_m64 included, keeps
    exactly its own options, so a `-m attention=softmax,favor_plus,...` sweep runs each as configured."""
    own = config("experiment=quickstart", f"attention={attention}", "~experiment_attention").attention
    cfg = config("experiment=quickstart", f"attention={attention}")
    if own.name == "favor" and own.kwargs.num_features == 256:
        check_config(cfg)
        assert cfg.attention.kwargs.num_features == 64
        assert {**cfg.attention.kwargs, "num_features": 256} == dict(own.kwargs)
    else:
        assert cfg.attention == own


def test_quickstart_feature_count_still_yields_to_the_command_line():
    assert config("attention=favor_plus").attention.kwargs.num_features == 256  # no experiment: untouched
    cfg = config("experiment=quickstart", "attention=favor_plus", "attention.kwargs.num_features=128")
    assert cfg.attention.kwargs.num_features == 128
