"""Metric loggers: W&B that never blocks (online when logged in, else offline), CSV, or none."""

from __future__ import annotations

import netrc
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from efficient_attn_tasks.config.checks import LOGGER_KEYS  # noqa: F401  (the config check's copy: one list of keys)
from efficient_attn_tasks.config.labels import attention_config

if TYPE_CHECKING:
    from pytorch_lightning.loggers import Logger, WandbLogger


def wandb_mode(configured: str | None) -> str:
    """Config ``logger.mode``, else ``WANDB_MODE``, else online when an API key is known, else offline."""
    if configured:
        return configured
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if _logged_in() else "offline"


def _logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def make_logger(cfg: DictConfig, out_dir: Path) -> Logger | bool:
    """The configured logger; W&B falls back to offline if an online start fails or times out."""
    kind = cfg.logger.kind
    if kind == "none":
        return False
    if kind == "csv":
        from pytorch_lightning.loggers import CSVLogger

        return CSVLogger(out_dir, name="", version="")
    return _wandb_logger(cfg, out_dir, wandb_mode(cfg.logger.mode))


def _wandb_logger(cfg: DictConfig, out_dir: Path, mode: str) -> WandbLogger:
    import wandb
    from pytorch_lightning.loggers import WandbLogger
    from pytorch_lightning.utilities import rank_zero_only

    config_name = attention_config(cfg)
    kwargs: dict[str, Any] = dict(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=cfg.name,  # the experiment; within it, job_type tells the attention configs apart
        job_type=config_name[:64],
        tags=[t[:64] for t in dict.fromkeys([cfg.attention.name, config_name, cfg.task.name])],  # W&B: <= 64 chars
        name=out_dir.name,  # the run dir: <time>_<task>_<attention config> or <job>_<attention config>
        save_dir=str(out_dir),
        config=OmegaConf.to_container(cfg, resolve=True),
        log_model=cfg.logger.log_model,
        settings=wandb.Settings(init_timeout=float(cfg.logger.init_timeout), silent=True),
    )
    id_file = out_dir / "wandb_id"  # a resumed run (ckpt_path=last) continues the same W&B run
    if id_file.exists():
        kwargs.update(id=id_file.read_text().strip(), resume="allow")
    logger = WandbLogger(mode=mode, **kwargs)
    try:
        logger.experiment  # starts the run here, so a failure is caught here and not mid-training
    except Exception as err:  # noqa: BLE001 - any failure to reach W&B: bad key, no network, timeout
        if mode != "online":
            raise
        warnings.warn(f"W&B online start failed ({type(err).__name__}: {err}); logging offline instead")
        finish_wandb()
        logger = WandbLogger(mode="offline", **kwargs)
        logger.experiment
    if rank_zero_only.rank == 0 and isinstance(getattr(logger.experiment, "id", None), str):
        id_file.write_text(logger.experiment.id + "\n")
    return logger


def finish_wandb() -> None:
    """End the active W&B run, if any (multirun jobs otherwise log into one run)."""
    import sys

    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def wandb_offline_note() -> str | None:
    """``W&B offline: sync with: wandb sync <dir>`` while an offline W&B run is active, else None."""
    import sys

    if "wandb" not in sys.modules:
        return None
    import wandb

    run = wandb.run
    if run is None:
        return None
    try:
        settings = run.settings
        if getattr(settings, "mode", None) not in ("offline", "dryrun") and not getattr(settings, "_offline", False):
            return None
        sync_dir = getattr(settings, "sync_dir", None) or str(Path(run.dir).parent)
    except Exception:  # noqa: BLE001 - a note is never worth failing a finished run
        return None
    return f"W&B offline: sync with: wandb sync {sync_dir}"
