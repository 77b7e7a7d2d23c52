"""Finding and loading pretrained diffusion models, with errors that say what to do.

Shared by the Stable Diffusion and DeepFloyd IF priors (and any other diffusers-format prior).

How a model reference is resolved (`resolve_model`):
  1. An existing local folder: checked against the expected diffusers layout (a missing part is
     named) and loaded from there. A single-file checkpoint gets a conversion hint.
  2. A hub id whose files are already in the local Hugging Face cache: loaded from the cached
     snapshot folder without touching the network (no slow retries on a machine without one).
  3. Otherwise, unless offline (`local_files_only: true`, HF_HUB_OFFLINE=1 or
     TRANSFORMERS_OFFLINE=1), the components are downloaded by id through diffusers and
     transformers. Offline or unreachable: `ModelNotFoundError` names the model, says it is not
     cached, and how to download it elsewhere and pass the folder (`--model DIR`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from distill3d.engine.errors import UserError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")


class PriorError(UserError, RuntimeError):
    """A prior that cannot be built or run; the message says what to do (the CLI prints it as is)."""


class ModelNotFoundError(PriorError):
    """The model is neither a local folder nor in the local cache, and cannot be downloaded."""


class GatedModelError(ModelNotFoundError):
    """The hub refused the download because the model is gated (licence to accept, login)."""


class InvalidModelFolderError(PriorError):
    """A local folder that is not the diffusers model it should be (the message names what is missing)."""


class EmptyPromptError(UserError, ValueError):
    """A text prior was asked to guide with an empty prompt."""


class PriorOutOfMemoryError(PriorError):
    """CUDA ran out of memory inside a prior; the message lists what to lower."""


# ---------------------------------------------------------------------------------------------
# Offline mode and hub helpers


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def offline_mode() -> bool:
    """True when the environment forbids hub access (read at call time, not import time)."""
    return any(_truthy(os.environ.get(k)) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"))


def hf_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # noqa: BLE001
        return "~/.cache/huggingface/hub"


def looks_like_path(model: str) -> bool:
    """A reference the user meant as a folder rather than a hub id ("org/name")."""
    if model.startswith(("/", "./", "../", "~", "\\")) or (len(model) > 1 and model[1] == ":"):
        return True
    return model.count("/") > 1 or (os.sep != "/" and os.sep in model)


# ---------------------------------------------------------------------------------------------
# Folder layouts


@dataclass(frozen=True)
class Component:
    """One subfolder of a diffusers pipeline folder."""

    subfolder: str
    # Alternatives: the folder is fine if all files of at least one group exist.
    file_groups: tuple[tuple[str, ...], ...] = ()
    needs_weights: bool = False
    # Weights needed only when the component is actually loaded (the text encoder, whose output
    # is cached on disk): a folder without them is accepted until they are needed.
    lazy_weights: bool = False


@dataclass(frozen=True)
class ModelLayout:
    kind: str  # "Stable Diffusion", "DeepFloyd IF stage I"
    components: tuple[Component, ...]
    example_id: str
    gated: bool = False
    hub_url: str = ""

    def config_files(self) -> list[str]:
        """The small files that must be present (first alternative of each group)."""
        return [f"{c.subfolder}/{g[0]}" for c in self.components for g in c.file_groups[:1]]


def _weight_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES) and p.exists())


def missing_parts(folder: Path, layout: ModelLayout, include_lazy: bool = False) -> list[str]:
    """What a folder lacks to be a model of this layout (empty when complete)."""
    missing: list[str] = []
    for comp in layout.components:
        sub = folder / comp.subfolder
        if not sub.is_dir():
            missing.append(f"{comp.subfolder}/")
            continue
        if comp.file_groups and not any(all((sub / f).is_file() for f in group) for group in comp.file_groups):
            options = " or ".join("+".join(group) for group in comp.file_groups)
            missing.append(f"{comp.subfolder}/{options}")
        if comp.needs_weights and (include_lazy or not comp.lazy_weights) and not _weight_files(sub):
            missing.append(f"{comp.subfolder}/ weights (*.safetensors or *.bin)")
    return missing


def check_model_folder(folder: Path, layout: ModelLayout) -> None:
    """Raise InvalidModelFolderError naming what is missing (or a conversion hint for one file)."""
    if folder.is_file():
        if folder.suffix in (".ckpt", ".safetensors", ".pt", ".bin"):
            raise InvalidModelFolderError(
                f"{folder} is a single checkpoint file; the {layout.kind} prior needs a diffusers model folder. "
                f"Convert it once with diffusers, e.g. in Python: "
                f"StableDiffusionPipeline.from_single_file({str(folder)!r}).save_pretrained('DIR'), then pass --model DIR."
            )
        raise InvalidModelFolderError(f"{folder} is a file, not a diffusers {layout.kind} model folder")
    missing = missing_parts(folder, layout)
    if missing:
        expected = ", ".join(f"{c.subfolder}/" for c in layout.components)
        raise InvalidModelFolderError(
            f"{folder} is not a diffusers {layout.kind} model folder: missing {', '.join(missing)}. "
            f"Expected the layout of a diffusers pipeline folder ({expected} each with its config), as written by "
            f"`huggingface-cli download {layout.example_id} --local-dir DIR` or Pipeline.save_pretrained(DIR)."
        )


# ---------------------------------------------------------------------------------------------
# Resolving a model reference


@dataclass(frozen=True)
class ResolvedModel:
    """Where the components of a model come from."""

    name: str  # as the user wrote it
    ref: str  # what from_pretrained gets: a folder path or a hub id
    folder: Path | None  # local folder or cached snapshot (None until downloaded)
    hub_id: str | None = None
    revision: str | None = None
    local_files_only: bool = True
    commit: str | None = None  # hub snapshot commit, when known

    @property
    def identity(self) -> str:
        """Model identity for cache keys: hub id (+ commit) or the absolute folder."""
        if self.hub_id:
            return f"hub:{self.hub_id}@{self.commit or self.revision or 'main'}"
        return f"dir:{self.folder}"


def not_cached_message(model: str, layout: ModelLayout, reason: str = "") -> str:
    lines = [
        f"{layout.kind} model {model!r} is not available here: it is not a local folder and not in the local "
        f"Hugging Face cache ({hf_cache_dir()}), and it cannot be downloaded"
        + (f" ({reason})" if reason else " (offline: no network, or HF_HUB_OFFLINE=1 / local_files_only).")
    ]
    if layout.gated:
        lines.append(
            f"{model} is gated on the hub: first accept its licence at {layout.hub_url or 'https://huggingface.co/' + model} "
            "with your account, and log in on the downloading machine (`huggingface-cli login` or HF_TOKEN)."
        )
    lines.append(
        f"Download it on a machine with internet: `huggingface-cli download {model} --local-dir DIR` "
        f"(or `hf download {model} --local-dir DIR`), copy DIR here and pass it with `--model DIR` "
        "(recipe key guidance.<i>.prior.model)."
    )
    return "\n".join(lines)


def gated_message(model: str, layout: ModelLayout) -> str:
    url = layout.hub_url or f"https://huggingface.co/{model}"
    return (
        f"{layout.kind} model {model!r} is gated on the Hugging Face hub: accept its licence at {url} while logged in, "
        "then authenticate this machine (`huggingface-cli login` or the HF_TOKEN environment variable) and run again. "
        f"Or download it where you are logged in (`huggingface-cli download {model} --local-dir DIR`) and pass `--model DIR`."
    )


def _cached_snapshot(hub_id: str, layout: ModelLayout, revision: str | None) -> Path | None:
    """The cached snapshot folder of a hub model (located by its first config file), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    anchor = layout.config_files()[0]
    try:
        path = try_to_load_from_cache(hub_id, anchor, revision=revision)
    except Exception:  # noqa: BLE001 - an invalid repo id, for one
        return None
    if not isinstance(path, str):
        return None
    return Path(path).parents[len(Path(anchor).parts) - 1]


def resolve_model(model: str, layout: ModelLayout, local_files_only: bool | None = None, revision: str | None = None) -> ResolvedModel:
    """Resolve a folder or hub id to where its components load from (see the module docstring)."""
    if not isinstance(model, str) or not model.strip():
        raise ModelNotFoundError(f"no {layout.kind} model given: set the prior's `model` to a hub id (e.g. {layout.example_id}) or a folder")
    model = model.strip()
    path = Path(model).expanduser()
    if path.exists():
        check_model_folder(path, layout)
        folder = path.resolve()
        return ResolvedModel(model, str(folder), folder, None, revision, True)
    if looks_like_path(model):
        raise ModelNotFoundError(
            f"{layout.kind} model folder {model!r} does not exist. Pass an existing diffusers model folder, or a hub id "
            f"such as {layout.example_id}."
        )
    offline = bool(local_files_only) or offline_mode()
    snapshot = _cached_snapshot(model, layout, revision)
    if snapshot is not None and not missing_parts(snapshot, layout):
        return ResolvedModel(model, str(snapshot), snapshot, model, revision, True, snapshot.name)
    if offline:
        if snapshot is not None:
            reason = "the cached copy is incomplete: missing " + ", ".join(missing_parts(snapshot, layout)) + "; offline"
            raise ModelNotFoundError(not_cached_message(model, layout, reason))
        raise ModelNotFoundError(not_cached_message(model, layout))
    # Online: one small download first, so a missing network or a gated repo fails once, early.
    try:
        from huggingface_hub import hf_hub_download

        first = layout.config_files()[0]
        path = Path(hf_hub_download(model, first, revision=revision))
        snapshot = path.parents[len(Path(first).parts) - 1]
    except Exception as exc:  # noqa: BLE001
        raise hub_error(model, layout, exc) from exc
    return ResolvedModel(model, model, snapshot, model, revision, False, snapshot.name)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def hub_error(model: str, layout: ModelLayout, exc: BaseException) -> PriorError:
    """Turn a hub / OS error raised while fetching `model` into a clear PriorError."""
    names = [type(e).__name__ for e in _chain(exc)]
    text = " ".join(str(e) for e in _chain(exc)).lower()
    if "GatedRepoError" in names or "gated" in text or "401" in text and layout.gated:
        return GatedModelError(gated_message(model, layout))
    if "RepositoryNotFoundError" in names or "is not a valid model identifier" in text or "repository not found" in text:
        return ModelNotFoundError(
            f"{layout.kind} model {model!r} was not found on the Hugging Face hub (check the id; private or gated "
            f"models need `huggingface-cli login`). A local folder is passed with `--model DIR`."
        )
    if "RevisionNotFoundError" in names:
        return ModelNotFoundError(f"{layout.kind} model {model!r}: revision not found on the hub")
    reason = ""
    if any(n in names for n in ("ConnectError", "ConnectionError", "gaierror", "ConnectTimeout", "OfflineModeIsEnabled")):
        reason = "no connection to the hub"
    elif "LocalEntryNotFoundError" in names:
        reason = "offline or no connection to the hub"
    else:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return ModelNotFoundError(not_cached_message(model, layout, reason))


# ---------------------------------------------------------------------------------------------
# Loading components


def _transformers_dtype_kwarg() -> str:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def load_component(
    cls: Any,
    source: ResolvedModel,
    subfolder: str,
    layout: ModelLayout,
    dtype: torch.dtype | None = None,
    variant: str | None = None,
    library: str = "diffusers",
    **kwargs,
) -> Any:
    """cls.from_pretrained(source, subfolder=...) with hub/OS errors turned into PriorErrors."""
    kw: dict[str, Any] = dict(kwargs)
    if source.ref == source.hub_id:  # loading by id (downloading); a folder has no revision
        kw["revision"] = source.revision
    kw["local_files_only"] = source.local_files_only
    if variant and source.folder is not None:
        # A local folder saved without the variant (e.g. --model DIR with plain weights): the
        # variant is a download-size choice, so fall back to the plain files that are there.
        folder = Path(source.folder) / subfolder
        if folder.is_dir() and not any(f".{variant}." in p.name for p in folder.iterdir()):
            variant = None
    if variant:
        kw["variant"] = variant
    if dtype is not None:
        kw["torch_dtype" if library == "diffusers" else _transformers_dtype_kwarg()] = dtype
    if library == "diffusers" and "low_cpu_mem_usage" not in kw and importlib.util.find_spec("accelerate") is None:
        kw["low_cpu_mem_usage"] = False  # avoids a warning per component
    try:
        return cls.from_pretrained(source.ref, subfolder=subfolder, **kw)
    except ImportError as exc:
        raise PriorError(f"loading {subfolder}/ of {source.name} needs a package that is not installed: {exc}") from exc
    except (OSError, ValueError, EnvironmentError) as exc:
        if source.hub_id and not source.local_files_only:
            raise hub_error(source.name, layout, exc) from exc
        where = source.folder or source.ref
        hint = ""
        if variant:
            hint = f" (asked for weight variant {variant!r}: set the prior's `variant` to null if the folder has plain weights)"
        raise InvalidModelFolderError(
            f"could not load {subfolder}/ of the {layout.kind} model from {where}{hint}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc


def source_with_weights(
    source: ResolvedModel, layout: ModelLayout, subfolder: str, why: str, local_files_only: bool | None = None
) -> ResolvedModel:
    """Where to load a lazily needed component (the text encoder) from.

    A folder that has its weights: itself. A cached hub snapshot without them: the hub id, to
    download them (unless offline). A plain folder without them: a clear error.
    """
    if source.folder is None or source.ref == source.hub_id or _weight_files(Path(source.folder) / subfolder):
        return source
    if source.hub_id:
        if bool(local_files_only) or offline_mode():
            raise ModelNotFoundError(
                not_cached_message(source.hub_id, layout, f"the cached copy lacks {subfolder}/ weights, needed {why}; offline")
            )
        return ResolvedModel(source.name, source.hub_id, source.folder, source.hub_id, source.revision, False, source.commit)
    raise InvalidModelFolderError(
        f"{source.folder}/{subfolder}/ has no weights (*.safetensors or *.bin); they are needed {why}. "
        f"Restore the folder, e.g. `huggingface-cli download {layout.example_id} --local-dir DIR` for the default model."
    )


# ---------------------------------------------------------------------------------------------
# Devices, precision and CUDA out-of-memory


def pick_dtype(device: torch.device, half_precision: bool | None, ctx_half_precision: bool = True) -> torch.dtype:
    """The prior's network dtype. CPU: always fp32 (half precision there is slow and some ops lack
    kernels). CUDA: fp16 when half_precision is true; when it is null, follow the run's mixed
    precision setting (BuildContext.half_precision, on by default in the trainer)."""
    if torch.device(device).type != "cuda":
        return torch.float32
    want = ctx_half_precision if half_precision is None else half_precision
    return torch.float16 if want else torch.float32


OOM_ERRORS: tuple[type, ...] = (torch.cuda.OutOfMemoryError,)


@dataclass
class OOMAdvice:
    """What to tell a user whose GPU ran out of memory in a prior."""

    kind: str  # "Stable Diffusion"
    model: str
    hints: list[str] = field(default_factory=list)

    def message(self, what: str, exc: BaseException) -> str:
        lines = [f"CUDA ran out of memory in the {self.kind} {what} ({self.model}). Lower, in this order:"]
        lines += [f"  - {h}" for h in self.hints]
        lines.append("  - or close other processes that use the GPU (nvidia-smi lists them)")
        first = str(exc).splitlines()[0] if str(exc) else ""
        lines.append(f"(original error: {first})")
        return "\n".join(lines)


@contextlib.contextmanager
def oom_guard(advice: OOMAdvice, what: str) -> Iterator[None]:
    """Re-raise CUDA out-of-memory inside the block as PriorOutOfMemoryError with advice."""
    try:
        yield
    except OOM_ERRORS as exc:
        raise PriorOutOfMemoryError(advice.message(what, exc)) from exc


def release_memory() -> None:
    """Give freed memory back (after dropping a text encoder)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def call_quietly(fn: Callable[[], Any]) -> Any:
    """Run fn with diffusers/transformers info/warning logs lowered to errors."""
    loggers = []
    for mod in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            lib = __import__(mod, fromlist=["get_verbosity"])
            loggers.append((lib, lib.get_verbosity()))
            lib.set_verbosity_error()
        except Exception:  # noqa: BLE001
            pass
    try:
        return fn()
    finally:
        for lib, level in loggers:
            lib.set_verbosity(level)
