"""Config of the ``compress`` stage (no torch/numpy imports: recipes validate without them)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from compress.registry import register_stage


class CompressStageConfig(BaseModel):
    """Lossless packing of the model state into ``<stage out_dir>/weights.czip``."""

    model_config = ConfigDict(extra="forbid")

    level: int = Field(
        3,
        ge=1,
        le=22,
        description="zstd level for every byte stream; 1-3 use parameters tuned for weight "
        "streams (literal-heavy, fastest), higher levels trade speed for a little size.",
    )
    chunk_size: int = Field(
        1 << 20,
        ge=4096,
        le=16 << 20,
        description="Raw bytes per independently coded chunk (the unit of parallelism, "
        "checksumming and bounded memory).",
    )
    threads: int | None = Field(None, ge=1, description="Worker threads for coding; null uses every core.")
    filename: str = Field(
        "weights.czip",
        pattern=r"^[A-Za-z0-9._-]+$",
        description="Name of the container written into the stage's output folder.",
    )


register_stage(
    "compress",
    CompressStageConfig,
    apply="compress.lossless.stage:apply",
    summary="Lossless ZipNN-style coding of the weights, integer codes and masks",
    order=50,
    describes_model=True,
    changes_model=False,
)
