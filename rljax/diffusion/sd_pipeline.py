"""``DefaultDDPOStableDiffusionPipeline``: TRL 0.7.11's Stable Diffusion pipeline for DDPO
(``trl/models/modeling_sd_base.py``), built from rljax's Flax ``UNet2DConditionModel``, VAE
decoder and CLIP text encoder, loading a diffusers pipeline folder (``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``; safetensors only).

It implements :class:`rljax.diffusion.pipeline.DDPOPipeline`, so ``rljax.trainers.DDPOTrainer``
drives it as it drives the tiny pipeline. Latents are channels-last ``[B, h, w, 4]`` with
``h = w = unet.config.sample_size``; images ``[B, H, W, 3]`` in ``[0, 1]``.

As in TRL: the scheduler is diffusers' DDIM on the folder's scheduler config; the VAE and text
encoder are frozen; ``use_lora=True`` trains LoRA adapters (rank 4, alpha 4, PEFT's "gaussian"
init: ``A ~ N(0, 1/r^2)``, ``B = 0``) on the U-Net's attention ``to_q``/``to_k``/``to_v``/``to_out.0``
through :class:`rljax.models.peft.LoraModel`; ``params`` are then the adapters only. A
``pytorch_lora_weights.safetensors`` in the folder is loaded as the adapters and turns LoRA on
(TRL's behaviour). ``save_pretrained`` writes a diffusers pipeline folder (plus the adapters in
PEFT/diffusers key format, ``unet.<module>.lora_A.weight`` ``[r, in]`` / ``lora_B.weight``
``[out, r]``, with ``use_lora``).

Frozen parts that ``unet_apply`` / ``decode_latents`` use (the base U-Net with LoRA, the VAE) are
``frozen_params``; the DDPO trainer passes them into its jitted sampler, decoder and training step
as arguments, so at Stable Diffusion scale they never become constants of the compiled programs
(the text encoder's params are an argument of the jitted encoder).
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from rljax.diffusion.clip_text import load_clip_text
from rljax.diffusion.schedulers import DDIMSchedulerConfig
from rljax.diffusion.sd_io import torch_name
from rljax.diffusion.sd_unet import load_unet, save_unet
from rljax.diffusion.sd_vae import load_vae_decoder

__all__ = ["DefaultDDPOStableDiffusionPipeline", "CLIPPromptTokenizer", "LORA_WEIGHT_NAME", "SD_LORA_TARGETS"]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: TRL's ``target_modules`` (diffusers' names) and the flax module names they are.
SD_LORA_TARGETS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out_0"}
_LORA_RANK, _LORA_ALPHA = 4, 4
_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class CLIPPromptTokenizer:
    """The folder's CLIP tokenizer as the DDPO protocol uses it: ``__call__(prompts)`` ->
    ``[B, model_max_length]`` int32 ids (padded to ``max_length``, truncated, as Stable
    Diffusion's ``_encode_prompt``); ``batch_decode`` as transformers'. ``hf``: the tokenizer."""

    def __init__(self, hf_tokenizer: Any):
        self.hf = hf_tokenizer
        self.model_max_length = int(hf_tokenizer.model_max_length)

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        if isinstance(prompts, str):
            prompts = [prompts]
        out = self.hf(list(prompts), padding="max_length", max_length=self.model_max_length, truncation=True)
        return np.asarray(out["input_ids"], np.int32)

    def batch_decode(self, ids: Any, skip_special_tokens: bool = True) -> list:
        return self.hf.batch_decode(np.asarray(ids).tolist(), skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return len(self.hf)


def _resolve(name: str, revision: str) -> str:
    """A local folder as is; otherwise a hub snapshot (safetensors/json/txt only; lazy import)."""
    if os.path.isdir(name):
        if revision != "main":
            raise ValueError(f"pretrained_model_revision={revision!r} applies to hub repos; {name!r} is a local folder "
                             "(pass revision='main').")
        return name
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover
        raise ValueError(f"{name!r} is not a local folder and huggingface_hub is not installed.") from e
    return snapshot_download(name, revision=revision,
                             allow_patterns=["*.json", "*.txt", "*.safetensors", "tokenizer/*"])


def _lora_leaves(params: Any) -> Dict[Tuple[str, ...], Any]:
    return {p: v for p, v in flatten_dict(dict(params)).items() if p[-1] in ("lora_A", "lora_B")}


def init_lora(unet_params: Any, rng: jax.Array, r: int = _LORA_RANK) -> Any:
    """Fresh adapters ``{<module path>: {"lora_A": [in, r], "lora_B": [r, out]}}`` for every
    attention projection TRL targets (PEFT "gaussian": ``A ~ N(0, 1/r^2)``, ``B = 0``)."""
    flat = flatten_dict(dict(unet_params))
    targets = set(SD_LORA_TARGETS.values())
    scopes = sorted(p[:-1] for p in flat if p[-1] == "kernel" and p[-2] in targets and flat[p].ndim == 2)
    if not scopes:
        raise ValueError("The U-Net has no attention projections (to_q/to_k/to_v/to_out.0) to put LoRA on.")
    out = {}
    for i, scope in enumerate(scopes):
        d_in, d_out = flat[scope + ("kernel",)].shape
        out[scope + ("lora_A",)] = jax.random.normal(jax.random.fold_in(rng, i), (d_in, r), jnp.float32) / r
        out[scope + ("lora_B",)] = jnp.zeros((r, d_out), jnp.float32)
    return unflatten_dict(out)


def _merge(frozen: Any, lora: Any) -> Any:
    flat = flatten_dict(dict(frozen))
    flat.update(flatten_dict(dict(lora)))
    return unflatten_dict(flat)


def lora_state_dict(lora: Any) -> Dict[str, np.ndarray]:
    """Adapters -> diffusers/PEFT keys ``unet.<module>.lora_A.weight`` ``[r, in]`` / ``lora_B.weight`` ``[out, r]``."""
    out = {}
    for path, v in _lora_leaves(lora).items():
        name = torch_name(path[:-1] + ("bias",))[: -len(".bias")]
        out[f"unet.{name}.{path[-1]}.weight"] = np.ascontiguousarray(np.asarray(jax.device_get(v)).T)
    return out


def load_lora_state_dict(sd: Dict[str, np.ndarray], unet_params: Any) -> Any:
    """Adapters from a LoRA file: PEFT/diffusers keys (``lora_A``/``lora_B``) or TRL 0.7.11's
    converted ones (``lora.down``/``lora.up``, ``lora_linear_layer.down``/``up``), with or
    without the ``unet.`` prefix; a ``<module>.alpha`` tensor is folded into ``lora_B`` (rljax
    runs the adapters at scale 1, i.e. alpha = r, diffusers' default without alphas)."""
    import re

    names = {torch_name(p[:-1] + ("bias",))[: -len(".bias")]: p[:-1]
             for p in flatten_dict(dict(unet_params)) if p[-1] == "kernel"}
    pat = re.compile(r"^(?:unet\.)?(.+?)\.(lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down|"
                     r"lora_linear_layer\.up)\.weight$")
    alphas, out = {}, {}
    for k, v in sd.items():
        if k.endswith(".alpha"):
            alphas[re.sub(r"^unet\.", "", k[: -len(".alpha")])] = float(np.asarray(v))
            continue
        m = pat.match(k)
        if m is None:
            if k.startswith("text_encoder."):
                raise ValueError(f"LoRA file has text-encoder adapters ({k!r}); rljax trains U-Net adapters only.")
            raise ValueError(f"LoRA file key {k!r} is not a U-Net LoRA weight rljax reads.")
        module, kind = m.group(1), m.group(2)
        if module not in names:
            raise ValueError(f"LoRA file key {k!r} names {module!r}, which this U-Net does not have.")
        leaf = "lora_A" if kind in ("lora_A", "lora.down", "lora_linear_layer.down") else "lora_B"
        out[names[module] + (leaf,)] = np.asarray(v, np.float32).T
    for module, alpha in alphas.items():
        if module in names:
            b = names[module] + ("lora_B",)
            out[b] = out[b] * (alpha / out[b].shape[0])
    for p in list(out):
        other = p[:-1] + ("lora_B" if p[-1] == "lora_A" else "lora_A",)
        if other not in out:
            raise ValueError(f"LoRA file has {p[-1]} but not {other[-1]} for {'.'.join(p[:-1])}.")
    return unflatten_dict({p: jnp.asarray(v) for p, v in out.items()})


class DefaultDDPOStableDiffusionPipeline:
    """TRL's ``DefaultDDPOStableDiffusionPipeline(pretrained_model_name, *, pretrained_model_revision,
    use_lora)`` on rljax modules (see the module docstring).

    ``pretrained_model_name``: a local diffusers pipeline folder (or a hub id, fetched with
    ``huggingface_hub`` when reachable). ``seed``: the LoRA init key (rljax addition).
    """

    def __init__(self, pretrained_model_name: str, *, pretrained_model_revision: str = "main", use_lora: bool = True,
                 seed: int = 0):
        path = _resolve(pretrained_model_name, pretrained_model_revision)
        missing = [s for s in _SUBFOLDERS if not os.path.isdir(os.path.join(path, s))]
        if missing:
            raise ValueError(f"{pretrained_model_name!r} lacks the diffusers pipeline subfolders {missing}; pass a "
                             "folder written by StableDiffusionPipeline.save_pretrained.")
        self.pretrained_model = pretrained_model_name
        self.pretrained_revision = pretrained_model_revision
        self._path = path
        self.unet, unet_params = load_unet(os.path.join(path, "unet"))
        self.vae, self.vae_params = load_vae_decoder(os.path.join(path, "vae"))
        self.text_encoder, self.text_params = load_clip_text(os.path.join(path, "text_encoder"))
        from transformers import AutoTokenizer

        self.tokenizer = CLIPPromptTokenizer(AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer")))
        self.scheduler_config = DDIMSchedulerConfig.from_pretrained(path)
        size = self.unet.config.sample_size
        if size is None:
            raise ValueError("unet config sample_size is None; rljax needs it for the latent shape.")
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.latent_shape = (int(h), int(w), int(self.unet.config.in_channels))
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

        lora_file = os.path.join(path, LORA_WEIGHT_NAME)
        self.use_lora = bool(use_lora)
        lora = None
        if os.path.isfile(lora_file):
            from safetensors.numpy import load_file

            lora = load_lora_state_dict(dict(load_file(lora_file)), unet_params)
            self.use_lora = True
        elif use_lora:
            warnings.warn(f"No {LORA_WEIGHT_NAME} in {pretrained_model_name!r}: starting fresh LoRA adapters "
                          f"(r={_LORA_RANK}, alpha={_LORA_ALPHA}, gaussian init).")
        if self.use_lora:
            from rljax.models.peft import LoraModel

            self._frozen_unet = unet_params
            self._params = lora if lora is not None else init_lora(unet_params, jax.random.PRNGKey(seed))
            self._unet_module = LoraModel(base_module=self.unet, scaling=_LORA_ALPHA / _LORA_RANK)
        else:
            self._frozen_unet = None
            self._params = unet_params
            self._unet_module = self.unet
        self._encode = jax.jit(lambda p, ids: self.text_encoder.apply({"params": p}, ids))

    # -- the DDPO protocol -------------------------------------------------------------
    @property
    def params(self) -> Any:
        """The trainable params: the LoRA adapters (``use_lora``) or the whole U-Net."""
        return self._params

    def set_params(self, params: Any) -> None:
        self._params = params

    @property
    def frozen_params(self) -> Dict[str, Any]:
        """``{"unet": the frozen base U-Net (use_lora; else None), "vae": the VAE decoder}``."""
        return {"unet": self._frozen_unet, "vae": self.vae_params}

    def unet_params(self, params: Optional[Any] = None, frozen_params: Optional[Any] = None) -> Any:
        """The U-Net params tree the forward sees (base + adapters with ``use_lora``)."""
        params = self._params if params is None else params
        if not self.use_lora:
            return params
        frozen = self.frozen_params if frozen_params is None else frozen_params
        return _merge(frozen["unet"], params)

    def unet_apply(self, params: Any, latents: jax.Array, timesteps: jax.Array, embeds: jax.Array,
                   frozen_params: Optional[Any] = None) -> jax.Array:
        """``latents [B, h, w, 4]``, ``timesteps [B]``, ``embeds [B, L, D]`` -> noise prediction (pure).
        Under jit pass ``frozen_params`` (else the base U-Net is closed over as a constant)."""
        return self._unet_module.apply({"params": self.unet_params(params, frozen_params)}, latents, timesteps, embeds)

    def encode_prompts(self, prompts: Sequence[str]) -> jax.Array:
        """``[B, model_max_length, hidden_size]`` CLIP last hidden states (host call; jitted encoder)."""
        return self._encode(self.text_params, jnp.asarray(self.tokenizer(list(prompts))))

    def decode_latents(self, latents: jax.Array, frozen_params: Optional[Any] = None) -> jax.Array:
        """``[B, h, w, 4]`` -> images ``[B, h * f, w * f, 3]`` in ``[0, 1]`` (TRL: ``vae.decode(latents /
        scaling_factor)`` then the image processor's ``x / 2 + 0.5`` clamped). Pure; under jit pass
        ``frozen_params`` (else the VAE is closed over as a constant)."""
        vae_params = self.vae_params if frozen_params is None else frozen_params["vae"]
        x = self.vae.apply({"params": vae_params}, latents / self.vae.config.scaling_factor)
        return jnp.clip(x / 2 + 0.5, 0.0, 1.0)

    # -- TRL's accessors -------------------------------------------------------------------
    @property
    def scheduler(self) -> DDIMSchedulerConfig:
        return self.scheduler_config

    @property
    def autocast(self):
        import contextlib

        return contextlib.nullcontext if self.use_lora else None

    def get_trainable_layers(self) -> Any:
        """TRL's name for what trains: :attr:`params`."""
        return self._params

    def set_progress_bar_config(self, *args: Any, **kwargs: Any) -> None:
        """No progress bar inside the compiled sampler; accepted for TRL scripts."""

    # -- files -------------------------------------------------------------------------
    def save_pretrained(self, output_dir: str) -> None:
        """A diffusers pipeline folder: the U-Net (trained, or the base with ``use_lora``), the
        frozen VAE / text encoder / tokenizer copied from the source, the DDIM scheduler config,
        and with ``use_lora`` the adapters as ``pytorch_lora_weights.safetensors``."""
        from safetensors.numpy import save_file

        os.makedirs(output_dir, exist_ok=True)
        for sub in ("vae", "text_encoder", "tokenizer"):
            dst = os.path.join(output_dir, sub)
            if os.path.abspath(dst) != os.path.abspath(os.path.join(self._path, sub)):
                shutil.copytree(os.path.join(self._path, sub), dst, dirs_exist_ok=True)
        src_index = os.path.join(self._path, "model_index.json")
        if os.path.isfile(src_index):
            with open(src_index) as f:
                index = json.load(f)
            index["scheduler"] = ["diffusers", "DDIMScheduler"]  # TRL swaps in DDIM
            index["safety_checker"] = [None, None]
            with open(os.path.join(output_dir, "model_index.json"), "w") as f:
                json.dump(index, f, indent=2)
        self.scheduler_config.save_pretrained(os.path.join(output_dir, "scheduler"))
        save_unet(os.path.join(output_dir, "unet"), self.unet,
                  self._frozen_unet if self.use_lora else self._params)
        if self.use_lora:
            save_file(lora_state_dict(self._params), os.path.join(output_dir, LORA_WEIGHT_NAME),
                      metadata={"format": "pt"})
