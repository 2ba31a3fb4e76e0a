"""Model input: resolve what the user passed to a local safetensors directory, safely, and load it
block by block.

Accepted inputs
- a Hugging Face model directory (safetensors; pickle `.bin` only with `allow_pickle`),
- a GGUF file, or a directory holding one GGUF and no `config.json` (converted once through
  transformers' `gguf_file=` loader into a safetensors cache directory, so later runs stream it),
- a hub id `org/name` when a hub is reachable.

Safety: no pickle by default, no remote code by default, and no file name read from a model file
(shard index, tokenizer) may point outside the model directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .arch import ArchAdapter, adapter_for_config
from .atomic import atomic_dir
from .errors import InputError, OutputError

log = logging.getLogger(__name__)

__all__ = ["ModelSource", "resolve_model", "cache_root", "TOKENIZER_FILES"]

#: tokenizer and generation files carried from the input to the record and to exports
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def cache_root() -> Path:
    """Where converted inputs are cached (`LFQ_EXPORT_CACHE`, default `~/.cache/lfq-export`)."""
    return Path(os.environ.get("LFQ_EXPORT_CACHE", Path.home() / ".cache" / "lfq-export"))


def _inside(root: Path, name: str) -> Path:
    """`root/name`, refusing names that escape `root` (absolute, `..`, symlinks out)."""
    p = (root / name).resolve()
    if not p.is_relative_to(root.resolve()):
        raise InputError(f"{root}: file name {name!r} in a model file points outside the model directory")
    return p


@dataclass
class ModelSource:
    """A local HF model directory whose weights can be read tensor by tensor.

    Attributes:
        path: directory with config.json, safetensors shards and tokenizer files.
        config: the transformers config.
        adapter: the family adapter.
        weight_map: tensor name → shard file (inside `path`).
        origin: what the user passed.
    """

    path: Path
    config: Any
    adapter: ArchAdapter
    weight_map: dict[str, str]
    origin: str
    trust_remote_code: bool = False
    _handles: dict[str, Any] = field(default_factory=dict, repr=False)

    # ---- tensors -----------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def tied(self) -> bool:
        return self.adapter.tied(self.config) or f"{self.adapter.lm_head}.weight" not in self.weight_map

    def _handle(self, shard: str):
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(_inside(self.path, shard)), framework="pt", device="cpu")
        return self._handles[shard]

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, read from its shard (the tied head resolves to the embedding)."""
        if name not in self.weight_map and name == f"{self.adapter.lm_head}.weight" and self.tied:
            name = f"{self.adapter.embedding}.weight"
        if name not in self.weight_map:
            raise InputError(f"{self.origin}: tensor {name} is missing from the checkpoint")
        try:
            return self._handle(self.weight_map[name]).get_tensor(name)
        except SafetensorError as e:
            raise InputError(f"{self.origin}: cannot read tensor {name}: {e}") from None

    def names_with_prefix(self, prefix: str) -> list[str]:
        return sorted(n for n in self.weight_map if n.startswith(prefix))

    def block_state(self, i: int) -> dict[str, torch.Tensor]:
        """State dict of block i, names relative to the block."""
        prefix = self.adapter.block_prefix(i)
        return {n[len(prefix) :]: self.tensor(n) for n in self.names_with_prefix(prefix)}

    def non_block_names(self) -> list[str]:
        return sorted(n for n in self.weight_map if self.adapter.block_index(n) is None)

    def check_finite(self, names: Iterable[str] | None = None) -> None:
        """Refuse NaN/Inf weights before any compute, naming the first bad tensor."""
        for n in sorted(names if names is not None else self.weight_map):
            t = self.tensor(n)
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise InputError(f"{self.origin}: tensor {n} contains NaN or Inf values; the checkpoint is damaged")

    # ---- modules -----------------------------------------------------------------------------
    def skeleton(self) -> nn.Module:
        """The model with every parameter on the meta device (no memory)."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(
                self.config, dtype=torch.float32, trust_remote_code=self.trust_remote_code
            )

    def load_module(self, module: nn.Module, prefix: str, dtype: torch.dtype = torch.float32) -> nn.Module:
        """Materialise a meta-device submodule on CPU with its weights from the checkpoint."""
        state = {n[len(prefix) :]: self.tensor(n).to(dtype) for n in self.names_with_prefix(prefix)}
        module.to_empty(device="cpu")
        missing, unexpected = module.load_state_dict(state, strict=False)
        missing = [m for m in missing if not m.endswith("inv_freq")]
        if missing or unexpected:
            raise InputError(f"{self.origin}: {prefix}: missing {missing} unexpected {unexpected}")
        return module

    def load_model(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The whole model on CPU in `dtype` (for evaluation and generation)."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            str(self.path), dtype=dtype, trust_remote_code=self.trust_remote_code, use_safetensors=True
        )
        return model.eval()

    def tokenizer(self):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(self.path), trust_remote_code=self.trust_remote_code)
        except Exception as e:  # noqa: BLE001 - any loader failure is the same user problem
            raise InputError(f"{self.origin}: cannot load the tokenizer: {e}") from None

    def tokenizer_files(self) -> list[Path]:
        """The tokenizer/generation files present; a symlink that leads out of the model directory is
        refused (these files are copied into every export)."""
        present = [f for f in TOKENIZER_FILES if (self.path / f).is_file()]
        for f in present:
            _inside(self.path, f)
        return [self.path / f for f in present]


# ---- resolution -------------------------------------------------------------------------------
def resolve_model(spec: str | os.PathLike, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> ModelSource:
    """Turn a directory, GGUF file or hub id into a `ModelSource`, refusing bad input up front."""
    spec_s = str(spec)
    p = Path(spec_s).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return _from_hf_dir(_gguf_to_hf(p), origin=spec_s, allow_pickle=False, trust_remote_code=False)
    if p.is_dir():
        if not (p / "config.json").is_file():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return _from_hf_dir(_gguf_to_hf(ggufs[0]), origin=spec_s, allow_pickle=False, trust_remote_code=False)
            if len(ggufs) > 1:
                raise InputError(f"{p}: holds {len(ggufs)} GGUF files; pass the one to use")
            raise InputError(f"{p}: not a model directory (no config.json and no .gguf file)")
        return _from_hf_dir(p, origin=spec_s, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if p.exists():
        raise InputError(f"{p}: not a model directory or a .gguf file")
    if _looks_like_hub_id(spec_s):
        return _from_hf_dir(_download(spec_s, allow_pickle), origin=spec_s, allow_pickle=allow_pickle,
                            trust_remote_code=trust_remote_code)
    raise InputError(f"{spec_s}: no such file or directory (and not a hub id of the form org/name)")


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))


def _download(repo_id: str, allow_pickle: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"] + (["*.bin"] if allow_pickle else [])
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - offline, missing repo, auth: all mean "cannot get it"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{repo_id}: cannot download from the hub ({first}); pass a local directory or .gguf file") from None


def _read_config_json(d: Path) -> dict:
    try:
        cfg = json.loads((d / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{d}/config.json: unreadable ({e})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{d}/config.json: not a JSON object")
    return cfg


def _from_hf_dir(d: Path, *, origin: str, allow_pickle: bool, trust_remote_code: bool) -> ModelSource:
    from transformers import AutoConfig

    raw = _read_config_json(d)
    if raw.get("auto_map") and not trust_remote_code:
        raise InputError(f"{origin}: the model ships its own code (auto_map in config.json); "
                         "pass --trust-remote-code only if you trust it")
    # refuse an unsupported family before transformers tries to import anything for it
    adapter_for_config(type("C", (), {"model_type": raw.get("model_type"), "architectures": raw.get("architectures")}))
    try:
        config = AutoConfig.from_pretrained(str(d), trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{origin}: cannot parse config.json ({e})") from None
    adapter = adapter_for_config(config)
    if allow_pickle and not list(d.glob("*.safetensors")) and _pickle_files(d):
        d = _pickle_to_safetensors(d, origin)
    weight_map = _weight_map(d, origin, allow_pickle)
    src = ModelSource(d, config, adapter, weight_map, origin, trust_remote_code)
    src.tokenizer_files()  # refuses tokenizer files that lead out of the directory, before anything runs
    return src


def _weight_map(d: Path, origin: str, allow_pickle: bool) -> dict[str, str]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"{index}: unreadable shard index ({e})") from None
        for shard in set(wm.values()):
            if not _inside(d, shard).is_file():
                raise InputError(f"{origin}: shard {shard} named in the index is missing")
        _check_headers(d, sorted(set(wm.values())), origin)
        return dict(wm)
    shards = sorted(x.name for x in d.glob("*.safetensors"))
    if shards:
        wm = {}
        for shard, keys in _check_headers(d, shards, origin).items():
            wm.update({k: shard for k in keys})
        return wm
    if _pickle_files(d):
        raise InputError(f"{origin}: weights are pickle files ({_pickle_files(d)[0]}); pickle can run code when "
                         "loaded. Convert them to safetensors, or pass --allow-pickle if you trust the source")
    raise InputError(f"{origin}: no weights found (no *.safetensors)")


def _pickle_files(d: Path) -> list[str]:
    return sorted(x.name for x in d.glob("*.bin")) + sorted(x.name for x in d.glob("*.pt"))


def _check_headers(d: Path, shards: list[str], origin: str) -> dict[str, list[str]]:
    """Open every shard's header (catches truncated/corrupt files before compute)."""
    keys: dict[str, list[str]] = {}
    for shard in shards:
        path = _inside(d, shard)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys[shard] = list(f.keys())
            _check_safetensors_length(path, path.stat().st_size)
        except (SafetensorError, OSError, ValueError) as e:
            raise InputError(f"{origin}: {shard} is corrupt or truncated ({e})") from None
    return keys


def _check_safetensors_length(path: Path, size: int) -> None:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ValueError(f"file has {size} bytes, header needs {8 + n + end}")


def _pickle_to_safetensors(d: Path, origin: str) -> Path:
    """Convert trusted pickle weights once into a safetensors cache directory, so everything streams.

    `weights_only=True` still refuses arbitrary objects: only tensors and plain containers load."""
    from safetensors.torch import save_file

    pickles = _pickle_files(d)
    out = cache_root() / "pickle" / _file_key([d / p for p in pickles])
    if (out / "model.safetensors").is_file():
        return out
    state: dict[str, torch.Tensor] = {}
    for p in pickles:
        try:
            state.update(torch.load(d / p, map_location="cpu", weights_only=True))
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{origin}: cannot load pickle weights {p} ({e})") from None
    with atomic_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        shutil.copy2(d / "config.json", tmp / "config.json")
        for f in TOKENIZER_FILES:
            if (d / f).is_file():
                shutil.copy2(d / f, tmp / f)
    return out


def _file_key(paths: list[Path]) -> str:
    """Content key from size and the first/last 8 MiB of each file (cheap for 40 GB files)."""
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}".encode())
        with open(p, "rb") as f:
            h.update(f.read(8 << 20))
            if st.st_size > 16 << 20:
                f.seek(-(8 << 20), os.SEEK_END)
                h.update(f.read())
    return h.hexdigest()[:20]


def _gguf_to_hf(gguf_path: Path) -> Path:
    """Dequantize a GGUF once into a cached float32 safetensors HF directory."""
    out = cache_root() / "gguf" / _file_key([gguf_path])
    if (out / "config.json").is_file():  # converted (and checked) before; its key covers the file's size
        return out
    _check_gguf(gguf_path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors cache at %s (once)", gguf_path, out)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{gguf_path}: transformers cannot load this GGUF ({e})") from None
    # the weights are now plain float32: drop transformers' "gguf quantized" state so it saves them
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        with atomic_dir(out) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True)
            tok.save_pretrained(str(tmp))
            (tmp / "lfq_source.json").write_text(json.dumps({"gguf": str(gguf_path.resolve())}))
    except OutputError:
        if not (out / "config.json").is_file():  # not a concurrent conversion that finished first
            raise
    return out


#: longest metadata string accepted from an input GGUF (chat templates are the longest real ones, ~10–100 KB);
#: they are copied into the record's tokenizer and from there into every export
MAX_GGUF_STRING = 1 << 20
#: longest single vocabulary entry (token text or merge rule) accepted from an input GGUF
MAX_GGUF_TOKEN = 1 << 12


def _check_gguf(path: Path) -> None:
    """Parse the GGUF header and tensor table; a truncated or corrupt file, or one whose metadata
    strings are implausibly long, is refused here."""
    from gguf import GGUFReader, GGUFValueType

    try:
        r = GGUFReader(str(path))
        size = path.stat().st_size
        for t in r.tensors:
            if int(t.data_offset) + int(t.n_bytes) > size:
                raise ValueError(f"tensor {t.name} runs past the end of the file")
    except Exception as e:  # noqa: BLE001 - GGUFReader raises many types on bad input
        raise InputError(f"{path}: corrupt or truncated GGUF ({e})") from None
    for field in r.fields.values():
        if GGUFValueType.STRING not in field.types:
            continue
        limit = MAX_GGUF_TOKEN if field.types[0] == GGUFValueType.ARRAY else MAX_GGUF_STRING
        longest = max((len(field.parts[i]) for i in field.data), default=0)
        if longest > limit:
            raise InputError(f"{path}: metadata {field.name} holds a string of {longest} bytes (limit {limit}); "
                             "the file is damaged or not a model")


def copy_tokenizer_files(src: ModelSource, dest: Path) -> list[str]:
    """Copy the tokenizer/generation files of `src` into `dest`; returns the names copied."""
    dest.mkdir(parents=True, exist_ok=True)
    names = []
    for f in src.tokenizer_files():
        shutil.copy2(f, dest / f.name)
        names.append(f.name)
    return names
