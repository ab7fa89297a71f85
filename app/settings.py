"""Service configuration: environment -> Settings -> the app, the worker and the CLI.

With no environment at all everything lives under ``./data`` (SQLite database, a
filesystem broker, checkpoints): the embedded default. ``DATABASE_URL`` and ``BROKER_URL``
(or their ``ATTRIB_``-prefixed forms) switch to PostgreSQL and Redis; every other field is
``ATTRIB_<FIELD>``, e.g. ``ATTRIB_MAX_STEPS=500``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ATTRIB_", extra="ignore", frozen=True)

    data_dir: Path = Field(Path("data"), description="local folder of the embedded default")
    database_url: str = Field("", validation_alias=AliasChoices("DATABASE_URL", "ATTRIB_DATABASE_URL"),
                              description="SQLAlchemy URL; default sqlite:///<data_dir>/attrib.db")
    broker_url: str = Field("", validation_alias=AliasChoices("BROKER_URL", "ATTRIB_BROKER_URL"),
                            description="Celery broker; default filesystem:// under <data_dir>/broker")
    broker_dir: Path | None = Field(None, description="folder of the embedded (filesystem) broker; default "
                                    "<data_dir>/broker. Its files are only wake-ups for jobs kept in the "
                                    "database (the reaper re-sends lost ones), so a tmpfs such as /dev/shm "
                                    "is safe and much faster; API and workers must share it")
    operator_key: str | None = Field(None, description="an operator API key accepted besides stored keys")
    auth_cache_s: float = Field(2.0, description="seconds a checked key is remembered (revocation delay)")
    influence_cache_s: float = Field(1.0, ge=0, description="seconds an influence page is reused per API "
                                     "process (a newly finished attribution shows up within it; 0: off)")
    api_processes: int = Field(1, ge=1, description="HTTP server processes of 'attrib serve' on its port; "
                               "each has its own caches, writer and rate limits; /metrics adds them up")
    read_threads: int = Field(2, ge=1, description="threads that run the hot read routes' database work "
                              "at once, per API process (more only contend for the GIL)")

    web_session_s: float = Field(8 * 3600.0, gt=0, description="seconds a web page sign-in lasts (then the "
                                 "browser signs in again); revoking the key ends it at once")
    owner_counterfactual_min_members: int = Field(2, ge=1, description="members that must remain after "
                                                  "dropping every member trained on one owner's works, for "
                                                  "an owner-level counterfactual (fewer: refused, 409)")

    # Limits: a request past one gets a 4xx whose message names the setting.
    max_seeds_per_request: int = 64
    max_batch_seeds: int = 10_000
    max_steps: int = 1000
    max_top_k: int = 100
    max_verify_top_k: int = Field(200, ge=0, description="verify_top_k of one attribution (exact "
                                  "counterfactual sampling runs it may cost)")
    max_body_bytes: int = 1_000_000
    max_page_size: int = 500
    max_validation_samples: int = Field(2000, description="samples of one validation job (POST /validations)")
    max_validation_train_steps: int = Field(20_000, description="training steps of one validation job")

    # Per-key rate limit on the expensive routes (POST /generate, /attribute, /batches): a token
    # bucket of `rate_limit_burst` requests refilled at `rate_limit_per_minute`; 0 = off.
    rate_limit_per_minute: float = 600.0
    rate_limit_burst: int = 60

    # Jobs.
    job_max_attempts: int = Field(3, description="starts of one job before it is failed for good")
    job_soft_time_limit_s: int = 1800
    requeue_after_s: float = Field(60.0, gt=0, description="a message this old that no worker received is "
                                   "re-sent when the broker holds fewer messages than jobs await (lost), "
                                   "backing off per job; one a worker received without running the job, "
                                   "after this")
    stale_after_s: float = Field(120.0, gt=0, description="running job with no heartbeat this long -> "
                                 "re-sent, once per such period")
    heartbeat_s: float = 10.0
    reaper_interval_s: float = Field(15.0, description="how often the API looks for lost jobs; 0 = never")
    generate_chunk: int = Field(16, description="seeds sampled together by one worker pass")

    # Opt-outs.
    min_served_fraction: float = Field(0.25, ge=0, le=1, description="while opt-outs are being retrained, "
                                       "an ensemble serving fewer than this fraction of its n members "
                                       "answers generation requests with 409 naming the retrain "
                                       "(default n/4)")
    retrain_checkpoint_every: int = Field(50, ge=1, description="training steps between the saved states "
                                          "of a retrain job (a killed retrain resumes from the last)")

    # Worker.
    device: str = Field("auto", description="torch device of the worker: auto, cpu, cuda, cuda:1")
    worker_threads: int = Field(0, description="torch threads per worker process (0 = torch's default)")
    long_worker_threads: int = Field(1, ge=1, description="torch threads of the long-queue worker that "
                                     "'attrib serve' starts (it also runs at a lower CPU priority)")
    stop_grace_s: float = Field(10.0, ge=0, description="on SIGTERM a worker finishes the job in hand if "
                                "it should within this many seconds, else hands it back queued at once")
    lpips_rerank: int = Field(50, description="candidates LPIPS re-ranks for metric=lpips")

    # Attribution (README "Trust").
    default_score: Literal["influence", "resemblance"] = Field(
        "resemblance", description="what ranks when a request does not say (metric l2; lpips: influence)")
    default_verify_top_k: int = Field(50, ge=0, description="synthetic top sources re-ranked by exact "
                                      "counterfactuals when a request does not say (capped "
                                      "at max_verify_top_k)")
    decoys: int = Field(10_000, ge=0, description="decoy codes the p-values of one attribution count against")
    exact_decoys: int = Field(0, ge=0, description="decoys also run exactly (one sampling run each), for "
                              "empirical exact p-values of the verified works, reported beside the "
                              "synthetic ones that decide (at most decoys)")
    attributable_alpha: float = Field(0.05, gt=0, lt=1, description="family-wise error level of "
                                      "'attributable' (Bonferroni over the works ranked)")
    copy_ratio: float = Field(0.5, gt=0, description="a generation whose nearest training image lies within "
                              "this fraction of the training set's median nearest-neighbour distance is a "
                              "near-copy")

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        for name in ("max_seeds_per_request", "max_batch_seeds", "max_steps", "max_top_k", "max_body_bytes",
                     "max_page_size", "max_validation_samples", "max_validation_train_steps",
                     "job_max_attempts", "generate_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{self.data_dir / 'attrib.db'}")
        if not self.broker_url:
            object.__setattr__(self, "broker_url", "filesystem://")
        return self

    @property
    def embedded_db(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def broker_folder(self) -> Path:
        return self.broker_dir or self.data_dir / "broker"

    @property
    def checkpoint_dir(self) -> Path:
        return self.data_dir / "ensembles"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment once."""
    return Settings()
