"""Hub ids -> local paths: Hugging Face (`owner/name`, `owner/name/file.gguf`) and ModelScope
(`modelscope:owner/name`). Downloads show progress; offline failures say how to pass a local path."""

from __future__ import annotations

from pathlib import Path

from ..errors import DownloadError

# What a checkpoint directory needs; *.bin only when the repo has no safetensors.
_PATTERNS = ["*.json", "*.safetensors", "*.tiktoken", "*.txt", "*.jinja"]


def looks_like_hub_id(name: str) -> bool:
    name = name.removeprefix("modelscope:")
    parts = name.split("/")
    return 2 <= len(parts) <= 3 and all(parts) and not name.startswith((".", "/", "~"))


def download(model_id: str) -> Path:
    """Fetch `model_id` into the hub cache and return the local directory (or .gguf file)."""
    if model_id.startswith("modelscope:"):
        return _from_modelscope(model_id.removeprefix("modelscope:"))
    return _from_huggingface(model_id)


def _from_huggingface(model_id: str) -> Path:
    try:
        import huggingface_hub as hf
    except ImportError as e:  # pragma: no cover - a runtime dependency
        raise DownloadError(f"cannot download {model_id!r}: huggingface_hub is not installed "
                            "(pip install huggingface_hub), or pass a local path") from e
    parts = model_id.split("/")
    try:
        if len(parts) == 3:  # owner/name/file.gguf
            return Path(hf.hf_hub_download("/".join(parts[:2]), parts[2]))
        files = hf.list_repo_files(model_id)
        patterns = _PATTERNS if any(f.endswith(".safetensors") for f in files) else _PATTERNS + ["*.bin"]
        return Path(hf.snapshot_download(model_id, allow_patterns=patterns))
    except Exception as e:  # network, auth and not-found errors all end here
        raise DownloadError(
            f"could not download {model_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Check the network and the id, or download the checkpoint elsewhere and pass its local "
            "directory or .gguf file with -m PATH") from e


def _from_modelscope(model_id: str) -> Path:
    try:
        from modelscope import snapshot_download
    except ImportError as e:
        raise DownloadError(f"cannot download modelscope:{model_id}: the modelscope package is not "
                            "installed (pip install 'qwenkit[modelscope]'), or pass a local path") from e
    try:
        return Path(snapshot_download(model_id))
    except Exception as e:
        raise DownloadError(
            f"could not download {model_id!r} from ModelScope ({type(e).__name__}: {e}). Check the "
            "network and the id, or pass a local checkpoint directory with -m PATH") from e
