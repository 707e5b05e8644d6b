"""Export a trained policy, and load a policy back from an export, a run's ``final/`` folder or a run checkpoint.

Export folder (:func:`export_policy`)::

    pytorch_model.safetensors          Show-o keys (showo.model.*, showo.lm_head.*) in Show-o's OWN layout: the
                                       pre-concept vocabulary (58498 rows for Show-o 512), i.e. the trained weights
                                       with the concept rows taken out and the image/mask rows moved back down
    concepts/<name>/epoch_0_{embed,lm_head_weight,lm_head_bias}.pt
                                       the concept rows in UniCTokens' format (<c> then its tokens)
    unictask_export.json               manifest: concepts (add order, class words, token strings and ids), token
                                       counts, preset, tokenizer / MAGVIT sources, vocab sizes, dtype
    merged/pytorch_model.safetensors   optional (merged=True): one file with the concept rows in place (the
                                       post-surgery vocab, what ``ShowoBackend.export`` writes to run/final)

So ``build_policy(ModelConfig(showo_path=<export>/pytorch_model.safetensors, concept_checkpoint_dir=<export>/concepts,
concept_checkpoint_epoch=0, ...))`` rebuilds the trained policy bit for bit (load base → concept surgery → concept
rows, the service's normal load order); :func:`export_model_config` fills that config from the manifest and
:func:`load_exported_policy` does both. Show-o / UniCTokens code loads the same two parts the same way (Show-o
checkpoint, then UniCTokens' ``update_tokens_load_from_pretrained`` with the epoch_0 files).

:func:`load_policy` accepts, besides an export, a merged file / run ``final/`` folder (the concept layout is built
from the given ModelConfig + concept names, and checked against ``concepts/`` when present) and a run checkpoint
folder ``<run>/checkpoints/step_N`` (the learner's DeepSpeed module states; the service's own files, D15).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch

from backbone.build import ConceptSpec, Policy, as_concept_spec, build_policy, build_tokenizer, build_vq
from backbone.checkpoint import PREFIX, load_showo_state_dict, resolve_showo_file, save_showo_state_dict
from backbone.concepts import concept_checkpoint_files, save_concept_checkpoint
from backbone.config import ModelConfig
from backbone.phi import ShowoPhi, ShowoPhiConfig

log = logging.getLogger(__name__)

__all__ = ["MANIFEST_NAME", "EXPORT_EPOCH", "export_policy", "read_manifest", "export_model_config",
           "load_exported_policy", "policy_skeleton", "load_policy", "resolve_checkpoint", "latest_run_checkpoint",
           "strip_concept_rows", "DEEPSPEED_MODEL_FILE"]

MANIFEST_NAME = "unictask_export.json"
"""Manifest file of an export folder."""
EXPORT_EPOCH = 0
"""Epoch number N of the exported concept files (``epoch_0_*.pt``, as run/final)."""
DEEPSPEED_MODEL_FILE = Path("learner") / "learner" / "mp_rank_00_model_states.pt"
"""Module weights inside a run checkpoint folder (DeepSpeed, tag "learner"; keys ``inner.<ShowoPhi key>``)."""
_ROW_KEYS = ("model.embed_tokens.weight", "lm_head.weight", "lm_head.bias")
_MODEL_CFG_FIELDS = ("preset", "random_init", "tokenizer_path", "magvit_path", "num_understanding_tokens",
                     "num_generation_tokens", "num_stage3_tokens", "dtype", "seed")


# --------------------------------------------------------------------------------------------------- export
def _concept_block(policy: Policy) -> tuple[int, int]:
    """(first concept row, number of concept rows); the rows of all concepts are one contiguous block."""
    ids = sorted(i for ct in policy.concepts.values() for i in ct.all_ids)
    if not ids:
        return policy.tok.image_offset, 0
    if ids != list(range(ids[0], ids[0] + len(ids))) or ids[-1] + 1 != policy.tok.image_offset:
        raise ValueError(f"concept rows are not one block right before the image rows: {ids[:3]}..{ids[-3:]}, "
                         f"image_offset {policy.tok.image_offset}")
    return ids[0], len(ids)


def strip_concept_rows(policy: Policy) -> dict[str, torch.Tensor]:
    """The model's state dict in Show-o's pre-concept layout: concept rows removed from embed_tokens / lm_head
    (weight and bias), image and mask rows moved back down (the exact inverse of the concept surgery)."""
    start, n = _concept_block(policy)
    out = {}
    for k, v in policy.model.state_dict().items():
        v = v.detach().to("cpu")
        if k in _ROW_KEYS and n:
            v = torch.cat([v[:start], v[start + n:]], 0)
        out[k] = v.contiguous()
    return out


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file({PREFIX + k: v for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def export_policy(policy: Policy, out_dir: str | os.PathLike, model_cfg: ModelConfig,
                  class_words: dict[str, str | None] | None = None, merged: bool = False,
                  source: str | None = None) -> Path:
    """Write ``policy`` as an export folder (see the module docstring); returns the manifest path.

    ``model_cfg``: the config the policy was built with (token counts, preset, tokenizer / MAGVIT sources, seed
    of a random MAGVIT); ``class_words``: per concept, recorded in the manifest."""
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    start, n = _concept_block(policy)
    tok = policy.tok
    _save_safetensors(strip_concept_rows(policy), out / "pytorch_model.safetensors")
    concepts = []
    for name, ct in sorted(policy.concepts.items(), key=lambda kv: kv[1].concept_id):
        save_concept_checkpoint(policy.model, ct, out / "concepts" / name, EXPORT_EPOCH)
        concepts.append({"name": name, "class_word": (class_words or {}).get(name), "num_tokens": len(ct.token_ids),
                         "concept_str": ct.concept_str, "token_strs": list(ct.token_strs),
                         "concept_id": ct.concept_id, "token_ids": list(ct.token_ids)})
    if merged:
        save_showo_state_dict(policy.model, out / "merged" / "pytorch_model.safetensors")
    phi = dataclasses.asdict(policy.model.config)
    manifest = {
        "format": "unictask-grpo-export", "version": 1,
        "showo_file": "pytorch_model.safetensors", "layout": "pre-concept vocabulary (Show-o's own)",
        "merged_file": "merged/pytorch_model.safetensors" if merged else None,
        "concepts_dir": "concepts", "concept_epoch": EXPORT_EPOCH, "concepts": concepts,
        "model_config": {f: getattr(model_cfg, f) for f in _MODEL_CFG_FIELDS},
        "vocab": {"base_vocab_size": tok.vocab_size - n, "vocab_size": tok.vocab_size, "concept_rows": [start, n],
                  "image_offset": tok.image_offset, "base_image_offset": tok.image_offset - n,
                  "codebook_size": tok.codebook_size, "mask_id": tok.mask_id,
                  "showo_llm_vocab_size": tok.image_offset - 10},
        "phi_config": phi, "dtype": str(next(policy.model.parameters()).dtype).replace("torch.", ""),
        "source": source,
    }
    path = out / MANIFEST_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------------- loading
def read_manifest(export_dir: str | os.PathLike) -> dict:
    """The manifest of an export folder (FileNotFoundError / ValueError naming the file)."""
    path = Path(export_dir).expanduser() / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"not an export folder: {str(path)!r} is missing")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e
    if m.get("format") != "unictask-grpo-export" or m.get("version") != 1:
        raise ValueError(f"{path}: unknown export format {m.get('format')!r} version {m.get('version')!r}")
    return m


def export_model_config(export_dir: str | os.PathLike, tokenizer_path: str | None = None,
                        magvit_path: str | None = None) -> tuple[ModelConfig, list[ConceptSpec]]:
    """The ModelConfig (showo_path = the export's safetensors, concept rows from its concepts/ at epoch 0) and the
    concept specs that rebuild the exported policy with ``build_policy``. ``tokenizer_path`` / ``magvit_path``
    replace the recorded sources (an export moved to another machine)."""
    d = Path(export_dir).expanduser().resolve()
    m = read_manifest(d)
    fields = dict(m["model_config"])
    if tokenizer_path is not None:
        fields["tokenizer_path"] = tokenizer_path
    if magvit_path is not None:
        fields["magvit_path"] = magvit_path
    cfg = ModelConfig(**fields, showo_path=str(d / m["showo_file"]), concept_checkpoint_dir=str(d / m["concepts_dir"]),
                      concept_checkpoint_epoch=int(m["concept_epoch"]))
    specs = [ConceptSpec(c["name"], c.get("class_word")) for c in m["concepts"]]
    return cfg, specs


def load_exported_policy(export_dir: str | os.PathLike, device: str | torch.device = "cpu",
                         tokenizer_path: str | None = None, magvit_path: str | None = None) -> Policy:
    """Rebuild the exported policy (:func:`export_model_config` + ``build_policy``); the concept ids are checked
    against the manifest."""
    cfg, specs = export_model_config(export_dir, tokenizer_path, magvit_path)
    policy = build_policy(cfg, specs, device=device)
    for c in read_manifest(export_dir)["concepts"]:
        ct = policy.concepts[c["name"]]
        if ct.concept_id != c["concept_id"] or list(ct.token_ids) != c["token_ids"]:
            raise ValueError(f"{export_dir}: concept {c['name']!r} got ids {ct.concept_id}.. but the manifest "
                             f"records {c['concept_id']}.. (tokenizer differs from the one used in training?)")
    return policy


def policy_skeleton(cfg: ModelConfig, concepts, device: str | torch.device = "cpu") -> Policy:
    """Tokenizer with the concepts (sorted by name, as build_policy), MAGVIT-v2, and an UNINITIALISED ShowoPhi of
    the post-concept vocab, for loading a full (merged) state dict into. Nothing random is drawn for the Phi."""
    cfg.validate()
    if cfg.magvit_path is None and not cfg.random_init:
        raise ValueError("model.magvit_path is required (or model.random_init=true for a seeded random MAGVIT)")
    specs = sorted((as_concept_spec(c) for c in concepts), key=lambda s: s.name)
    vq = build_vq(cfg, device)
    tok = build_tokenizer(cfg, codebook_size=vq.codebook_size)
    added = {s.name: tok.add_concept(s.name, cfg.num_concept_tokens) for s in specs}
    phi_cfg = (ShowoPhiConfig.tiny(vocab_size=tok.vocab_size) if cfg.preset == "tiny"
               else ShowoPhiConfig.real(vocab_size=tok.vocab_size))
    with torch.device("meta"):
        model = ShowoPhi(phi_cfg)
    from backbone.build import DTYPES

    model = model.to_empty(device=device).to(DTYPES[cfg.dtype])
    return Policy(model=model, tok=tok, concepts=added, vq=vq, phi_config=model.config,
                  concept_source={s.name: "skeleton" for s in specs})


def _embed_rows(file: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt", device="cpu") as f:
        key = PREFIX + _ROW_KEYS[0]
        if key not in f.keys():
            raise ValueError(f"{file}: missing key {key!r} (not a Show-o checkpoint)")
        return int(f.get_slice(key).get_shape()[0])


def _check_concept_files(policy: Policy, concepts_dir: Path, epoch: int = EXPORT_EPOCH) -> None:
    """The loaded rows must equal the concept files beside a merged checkpoint (catches a concept order mismatch)."""
    w = {"embed": policy.model.model.embed_tokens.weight, "lm_head_weight": policy.model.lm_head.weight,
         "lm_head_bias": policy.model.lm_head.bias}
    for name, ct in policy.concepts.items():
        d = concepts_dir / name
        if not d.is_dir():
            continue
        for part, f in concept_checkpoint_files(d, epoch).items():
            if not f.is_file():
                continue
            saved = torch.load(f, map_location="cpu", weights_only=True)
            mine = w[part].detach().index_select(0, torch.tensor(ct.all_ids, device=w[part].device)).float().cpu()
            if tuple(saved.shape) != tuple(mine.shape) or not torch.equal(saved.float(), mine):
                raise ValueError(f"{f}: rows of concept {name!r} differ from the merged weights at ids "
                                 f"{ct.all_ids[0]}..; the concept list / order differs from the trained model's")


def _load_merged(file: Path, cfg: ModelConfig, concepts, device) -> Policy:
    policy = policy_skeleton(cfg, concepts, device)
    load_showo_state_dict(policy.model, file)
    policy.concept_source = {n: f"merged:{file}" for n in policy.concepts}
    if (file.parent / "concepts").is_dir():
        _check_concept_files(policy, file.parent / "concepts")
    return policy


def _load_deepspeed(ckpt: Path, cfg: ModelConfig, concepts, device) -> Policy:
    file = ckpt / DEEPSPEED_MODEL_FILE
    if not file.is_file():
        raise FileNotFoundError(f"run checkpoint {str(ckpt)!r} has no learner weights ({DEEPSPEED_MODEL_FILE})")
    # the service's own DeepSpeed checkpoint (D15: trusted); it holds non-tensor bookkeeping objects
    state = torch.load(file, map_location="cpu", weights_only=False)
    module = state.get("module") if isinstance(state, dict) else None
    if not isinstance(module, dict):
        raise ValueError(f"{file}: no 'module' state dict (not a DeepSpeed model-states file)")
    weights = {k[len("inner."):] if k.startswith("inner.") else k: v for k, v in module.items()}
    policy = policy_skeleton(cfg, concepts, device)
    own = policy.model.state_dict()
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    if missing or unexpected:
        raise ValueError(f"{file}: keys do not match the model built from the config: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    for k, t in own.items():
        if tuple(weights[k].shape) != tuple(t.shape):
            raise ValueError(f"{file}: {k!r} has shape {tuple(weights[k].shape)} but the config's model has "
                             f"{tuple(t.shape)} (different concepts or token counts?)")
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(weights[k].to(t.dtype))
    policy.concept_source = {n: f"run-checkpoint:{ckpt}" for n in policy.concepts}
    return policy


def latest_run_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint ``<run>/checkpoints/latest`` names, else the newest complete ``step_N`` folder."""
    root = Path(run_dir) / "checkpoints"
    complete = lambda q: q.is_dir() and (q / "COMPLETE").is_file() and (q / "state.json").is_file()  # noqa: E731
    if (root / "latest").is_file():
        named = root / (root / "latest").read_text().strip()
        if named.name and complete(named):
            return named
    ckpts = sorted(q for q in root.glob("step_*") if not q.name.endswith(".old") and complete(q)) \
        if root.is_dir() else []
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path: str | os.PathLike) -> tuple[str, Path]:
    """What ``path`` is: ("export", dir) | ("showo", safetensors file) | ("run_checkpoint", dir). A run folder
    resolves to its ``final/`` (if complete) else its latest complete checkpoint."""
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {str(p)!r}")
    if p.is_dir():
        if (p / MANIFEST_NAME).is_file():
            return "export", p
        if (p / DEEPSPEED_MODEL_FILE).is_file() or (p / "state.json").is_file():
            return "run_checkpoint", p
        if (p / "final").is_dir() and any((p / "final").glob("*.safetensors")):
            return resolve_checkpoint(p / "final")
        latest = latest_run_checkpoint(p)
        if latest is not None:
            return "run_checkpoint", latest
    return "showo", resolve_showo_file(p)


def load_policy(checkpoint: str | os.PathLike | None, cfg: ModelConfig, concepts=(),
                device: str | torch.device = "cpu") -> Policy:
    """The policy to evaluate / generate with / export.

    ``checkpoint``: None → ``build_policy(cfg, concepts)`` (the config's model as is); an export folder → as
    exported (``cfg`` and ``concepts`` are not used); a run checkpoint (or a run folder) → ``cfg``'s structure
    with the learner's weights; a Show-o safetensors file or folder (e.g. run/final): a merged file (concept
    rows in place) is loaded into ``cfg``'s structure, a pre-concept file gets the concept rows from
    ``<folder>/concepts/<name>/epoch_0_*.pt``."""
    if checkpoint is None:
        return build_policy(cfg, concepts, device=device)
    kind, p = resolve_checkpoint(checkpoint)
    log.info("loading %s from %s", kind, p)
    if kind == "export":
        return load_exported_policy(p, device)
    if kind == "run_checkpoint":
        return _load_deepspeed(p, cfg, concepts, device)
    from backbone.magvit import MagvitConfig

    rows = _embed_rows(p)
    specs = [as_concept_spec(c) for c in concepts]
    vq_cfg = MagvitConfig.tiny() if cfg.preset == "tiny" else MagvitConfig.real()
    tok = build_tokenizer(cfg, codebook_size=vq_cfg.codebook_size)
    base_vocab = tok.vocab_size
    full_vocab = base_vocab + len(specs) * (cfg.num_concept_tokens + 1)
    if rows == full_vocab:
        return _load_merged(p, cfg, specs, device)
    if rows == base_vocab:
        cdir = p.parent / "concepts"
        if specs and not cdir.is_dir():
            raise FileNotFoundError(f"{p} has Show-o's pre-concept vocabulary ({rows} rows) but {cdir} with the "
                                    "concept rows is missing")
        sub = dataclasses.replace(cfg, showo_path=str(p), concept_checkpoint_dir=str(cdir) if specs else None,
                                  concept_checkpoint_epoch=EXPORT_EPOCH if specs else None)
        return build_policy(sub, specs, device=device)
    raise ValueError(f"{p}: embed_tokens has {rows} rows; the config's model has {base_vocab} without concepts and "
                     f"{full_vocab} with {len(specs)} concept(s) of {cfg.num_concept_tokens + 1} rows")
