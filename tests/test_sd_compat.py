"""Stable Diffusion compatibility: rljax's Flax UNet2DConditionModel, VAE decoder and CLIP text
encoder against diffusers/transformers (PyTorch) on tiny random configs (diffusers' own SD test
sizes), the DDIM schedule against diffusers' DDIMScheduler, and DefaultDDPOStableDiffusionPipeline
driving rljax's DDPO sampler end to end."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from rljax.diffusion.schedulers import DDIMSchedulerConfig, make_ddim_schedule
from rljax.diffusion.sd_unet import UNet2DConditionConfig, load_unet
from rljax.diffusion.sd_vae import load_vae_decoder

ATOL = 1e-4
MAX_LEN = 8  # tokenizer model_max_length


def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _tiny_clip_tokenizer():
    """A byte-level CLIP BPE tokenizer built offline (all bytes, a few merges, CLIP's specials)."""
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = [("a", "b"), ("a", "b</w>")]
    for tok in ("ab", "ab</w>", "<|startoftext|>", "<|endoftext|>"):
        vocab[tok] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LEN)


def _randomize(module, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)  # zero-initialised layers get weights too
    return module


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    """A tiny random StableDiffusionPipeline saved with save_pretrained (safetensors)."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4, norm_num_groups=32)
    text_cfg = transformers.CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
        num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=1000, max_position_embeddings=16)
    text_encoder = transformers.CLIPTextModel(text_cfg)
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    for i, m in enumerate((unet, vae, text_encoder)):
        _randomize(m, seed=i).eval()
    pipe = diffusers.StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=_tiny_clip_tokenizer(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    path = str(tmp_path_factory.mktemp("tiny_sd"))
    pipe.save_pretrained(path, safe_serialization=True)
    return path, pipe


def _nhwc(t):
    return np.asarray(t.detach().numpy()).transpose(0, 2, 3, 1)


def test_unet_matches_diffusers(sd_dir):
    path, pipe = sd_dir
    module, params = load_unet(os.path.join(path, "unet"))
    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 801]), torch.randn(2, MAX_LEN, 32, generator=g)
    with torch.no_grad():
        ref = _nhwc(pipe.unet(x, t, encoder_hidden_states=ctx).sample)
    out = jax.jit(module.apply)({"params": params}, jnp.asarray(_nhwc(x)), jnp.asarray(t.numpy()),
                                jnp.asarray(ctx.numpy()))
    assert out.shape == (2, 8, 8, 4)
    np.testing.assert_allclose(np.asarray(out), ref, atol=ATOL)


def test_unet_variant_config_matches_diffusers(tmp_path):
    """layers_per_block=2, per-block heads, linear projections, two transformer layers, 8 groups."""
    torch.manual_seed(0)
    unet = _randomize(diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=True,
        transformer_layers_per_block=(2, 1), center_input_sample=True, freq_shift=1)).eval()
    unet.save_pretrained(str(tmp_path))
    module, params = load_unet(str(tmp_path))
    g = torch.Generator().manual_seed(2)
    x, t, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        ref = _nhwc(unet(x, t, encoder_hidden_states=ctx).sample)
    out = jax.jit(module.apply)({"params": params}, jnp.asarray(_nhwc(x)), jnp.asarray(t.numpy()),
                                jnp.asarray(ctx.numpy()))
    np.testing.assert_allclose(np.asarray(out), ref, atol=ATOL)


def test_configs_reject_unsupported_fields():
    from rljax.diffusion.clip_text import CLIPTextConfig
    from rljax.diffusion.sd_vae import AutoencoderKLConfig

    base = {"block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "_class_name": "UNet2DConditionModel"}
    UNet2DConditionConfig.from_dict(base)
    with pytest.raises(ValueError, match="class_embed_type"):
        UNet2DConditionConfig.from_dict({**base, "class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="some_new_field"):
        UNet2DConditionConfig.from_dict({**base, "some_new_field": 1})
    with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
        UNet2DConditionConfig.from_dict({**base, "down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]})
    with pytest.raises(ValueError, match="shift_factor"):
        AutoencoderKLConfig.from_dict({"block_out_channels": [32], "up_block_types": ["UpDecoderBlock2D"],
                                       "shift_factor": 0.1159})
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig.from_dict({"model_type": "clip_text_model", "hidden_act": "relu"})


def test_vae_decode_matches_diffusers(sd_dir):
    path, pipe = sd_dir
    module, params = load_vae_decoder(os.path.join(path, "vae"))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = _nhwc(pipe.vae.decode(z).sample)
    out = jax.jit(module.apply)({"params": params}, jnp.asarray(_nhwc(z)))
    assert out.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(np.asarray(out), ref, atol=ATOL)


def test_ddim_schedule_matches_diffusers(sd_dir):
    path, pipe = sd_dir
    config = DDIMSchedulerConfig.from_pretrained(path)
    for steps in (4, 50):
        ours = make_ddim_schedule(config, steps)
        pipe.scheduler.set_timesteps(steps)
        np.testing.assert_array_equal(np.asarray(ours.timesteps), pipe.scheduler.timesteps.numpy())
        np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), pipe.scheduler.alphas_cumprod.numpy(), rtol=1e-6)
        assert float(ours.final_alpha_cumprod) == pytest.approx(float(pipe.scheduler.final_alpha_cumprod))


# ---------------------------------------------------------------------------------------------
# DefaultDDPOStableDiffusionPipeline
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_pipe(sd_dir):
    from rljax.diffusion.sd_pipeline import DefaultDDPOStableDiffusionPipeline

    with pytest.warns(UserWarning, match="pytorch_lora_weights"):
        pipe = DefaultDDPOStableDiffusionPipeline(sd_dir[0], use_lora=True)
    # Random B so the adapters change the output (fresh ones start as a no-op).
    flat = jax.tree_util.tree_leaves_with_path(pipe.params)
    keys = jax.random.split(jax.random.PRNGKey(5), len(flat))
    pipe.set_params(jax.tree_util.tree_map_with_path(
        lambda p, v: jax.random.normal(keys[hash(jax.tree_util.keystr(p)) % len(keys)], v.shape) * 0.1, pipe.params))
    return pipe


def test_pipeline_lora_params_are_trl_targets(lora_pipe):
    from rljax.diffusion.sd_pipeline import lora_state_dict

    names = sorted(lora_state_dict(lora_pipe.params))
    # transformers: down_blocks.0 (1), mid (1), up_blocks.1 (2); each 2 attentions x 4 projections x (A, B)
    assert len(names) == 4 * 2 * 4 * 2
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight" in names
    assert lora_pipe.params["mid_block"]["attentions_0"]["transformer_blocks_0"]["attn2"]["to_k"]["lora_A"].shape == (32, 4)


def test_pipeline_lora_matches_diffusers_load_lora_weights(sd_dir, lora_pipe, tmp_path):
    """save_pretrained -> diffusers' StableDiffusionPipeline.load_lora_weights: same U-Net output;
    and rljax reloads the folder with the adapters on (TRL's use_lora detection)."""
    pytest.importorskip("peft")
    from rljax.diffusion.sd_pipeline import DefaultDDPOStableDiffusionPipeline

    lora_pipe.save_pretrained(str(tmp_path))
    ref_pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path), safety_checker=None)
    ref_pipe.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")
    g = torch.Generator().manual_seed(4)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([981, 21]), torch.randn(2, MAX_LEN, 32, generator=g)
    with torch.no_grad():
        ref = _nhwc(ref_pipe.unet(x, t, encoder_hidden_states=ctx).sample)
        base = _nhwc(sd_dir[1].unet(x, t, encoder_hidden_states=ctx).sample)
    apply = jax.jit(lora_pipe.unet_apply)
    out = np.asarray(apply(lora_pipe.params, jnp.asarray(_nhwc(x)), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy())))
    assert np.abs(ref - base).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(out, ref, atol=ATOL)
    again = DefaultDDPOStableDiffusionPipeline(str(tmp_path), use_lora=False)
    assert again.use_lora
    jax.tree_util.tree_map(np.testing.assert_array_equal, again.params, lora_pipe.params)


def test_pipeline_encode_prompts_matches_clip_text_model(sd_dir, lora_pipe):
    """CLIPTextModel parity (through the pipeline's tokenizer wrapper and jitted encoder)."""
    pipe = sd_dir[1]
    prompts = ["a cab", "ab ab ab ab ab ab ab ab", ""]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt")
    np.testing.assert_array_equal(lora_pipe.tokenizer(prompts), ids.input_ids.numpy())
    with torch.no_grad():
        ref = pipe.text_encoder(ids.input_ids)[0].numpy()
    np.testing.assert_allclose(np.asarray(lora_pipe.encode_prompts(prompts)), ref, atol=ATOL)


@pytest.mark.slow
def test_pipeline_samples_a_trajectory_through_the_ddpo_sampler(lora_pipe):
    """The tiny SD pipeline plugs into rljax.ddpo: CLIP prompts -> guided DDIM trajectory with
    log-probs (one lax.scan) -> VAE images in [0, 1]."""
    from rljax.ddpo import make_sample_fn
    from rljax.diffusion.pipeline import DDPOPipeline

    assert isinstance(lora_pipe, DDPOPipeline)
    steps = 3
    schedule = make_ddim_schedule(lora_pipe.scheduler_config, steps)
    sample = make_sample_fn(lora_pipe.unet_apply, lora_pipe.latent_shape, guidance_scale=5.0, eta=1.0)
    embeds = lora_pipe.encode_prompts(["a cab", "ab"])
    neg = lora_pipe.encode_prompts(["", ""])
    out = sample(lora_pipe.params, schedule, embeds, neg, jax.random.PRNGKey(0))
    assert out.latents.shape == (2, steps + 1, 8, 8, 4)
    assert out.log_probs.shape == (2, steps) and bool(jnp.all(jnp.isfinite(out.log_probs)))
    np.testing.assert_array_equal(np.asarray(out.timesteps[0]), np.asarray(schedule.timesteps))
    images = jax.jit(lora_pipe.decode_latents)(out.latents[:, -1])
    assert images.shape == (2, 16, 16, 3) and float(images.min()) >= 0.0 and float(images.max()) <= 1.0
