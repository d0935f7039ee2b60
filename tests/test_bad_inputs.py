"""Wrong uses of every public entry point give an early error of the right type whose words
tell the user what to fix (issue: "nothing lost, nothing silent").

One table: each case is a small function ``case(env)`` that makes one mistake, registered
with the exception type and a regex of the message. Cases whose check is not implemented
yet are strict xfails (``needs=...``): they turn into failures the day the check lands, so
the marker is removed with the fix. Nothing here compiles a training step; where a wrong
input would only be noticed by running one, the step's forward pass is replaced by a
sentinel that fails the case.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

CASES = []


def case(exc, match: str, needs: str = None):
    """Register ``fn(env)`` as a table row; ``needs``: a strict xfail naming the missing check."""

    def register(fn):
        marks = [pytest.mark.xfail(strict=True, reason=f"needs: {needs}")] if needs else []
        CASES.append(pytest.param(fn, exc, match, id=fn.__name__, marks=marks))
        return fn

    return register


class _Reached(Exception):
    """The wrong input got past validation into the training computation."""


class Env:
    """Lazily built tiny objects shared by the cases (nothing is compiled)."""

    def __init__(self, tokenizer, root):
        self.tok = tokenizer
        self.root = root
        self._cache = {}

    def _get(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    @property
    def lm(self):
        """(module, params): a 1-layer GPT-2 over the tiny tokenizer's 128 ids, 32 positions."""

        def build():
            import jax

            from rljax.models import init_params, model_from_config
            from rljax.models.gpt2 import GPT2Config

            module = model_from_config(GPT2Config(vocab_size=128, n_positions=32, n_embd=16, n_layer=1, n_head=2))
            return module, init_params(module, jax.random.PRNGKey(0))

        return self._get("lm", build)

    @property
    def vmodel(self):
        from rljax.models.heads import AutoModelForCausalLMWithValueHead

        return self._get("vmodel", lambda: AutoModelForCausalLMWithValueHead.from_lm(*self.lm))

    def ppo_trainer(self, **config):
        """A PPOTrainer (batch 2) whose forward pass raises ``_Reached`` (no compile)."""
        from rljax.ppo import PPOConfig
        from rljax.trainers.ppo import PPOTrainer

        def build():
            trainer = PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2, **config), self.vmodel, tokenizer=self.tok)

            def reached(*a, **k):
                raise _Reached("the bad input reached the forward pass")

            trainer._forward = reached
            return trainer

        return self._get(("ppo", tuple(sorted(config.items()))), build)

    def path(self, name: str) -> str:
        return str(self.root / name)

    @property
    def ckpt_dir(self) -> str:
        """A Checkpointer directory holding committed step 1 of a small state."""

        def build():
            from rljax.checkpoint import Checkpointer

            d = self.path("ck")
            with Checkpointer(d, async_save=False) as ck:
                ck.save(1, small_state())
            return d

        return self._get("ckpt", build)


def small_state():
    import jax
    import jax.numpy as jnp
    import optax

    from rljax.train_state import TrainState

    return TrainState.create({"w": jnp.ones((4, 4), jnp.float32)}, optax.adam(1e-3), jax.random.PRNGKey(0))


def q(*ids):
    return np.asarray(ids, np.int64)


def texts(n=8):
    return [{"text": "the movie was great and the acting was wonderful"}] * n


def pairs(n=4):
    return [{"prompt": "the movie", "chosen": " was great", "rejected": " was bad"}] * n


# --------------------------------------------------------------------------
# rljax.core
# --------------------------------------------------------------------------


@case(ValueError, "sum of the mask is zero.*increase `mini_batch_size`")
def core_whiten_mask_all_zero(env):
    from rljax.core import check_whiten_mask

    check_whiten_mask(np.zeros((2, 3)))


@case(ValueError, "sum of the mask is one.*unbiased=False")
def core_whiten_mask_single_token(env):
    from rljax.core import check_whiten_mask

    check_whiten_mask(np.eye(1, 3))


@case(ValueError, "separator '/' is not allowed in key 'a/b'")
def core_flatten_dict_key_with_separator(env):
    from rljax.core import flatten_dict

    flatten_dict({"x": {"a/b": 1}})


@case(ValueError, r"LengthSampler needs min_value < max_value \(max is exclusive\)")
def core_length_sampler_empty_range(env):
    from rljax.core import LengthSampler

    LengthSampler(4, 4)


# --------------------------------------------------------------------------
# rljax.ppo: functions and PPOConfig
# --------------------------------------------------------------------------


@case(ValueError, r"kl_penalty must be one of .*set PPOConfig\(kl_penalty=...\)")
def ppo_kl_penalty_unknown_mode(env):
    from rljax.ppo import kl_penalty

    kl_penalty(np.zeros(3), np.zeros(3), mode="kl2")


@case(ValueError, "pass both `logits` and `ref_logits`, or neither")
def ppo_compute_rewards_logits_without_ref_logits(env):
    from rljax.ppo import compute_rewards

    z = np.zeros((2, 3, 5), np.float32)
    compute_rewards(np.zeros(2), z, z, np.ones((2, 3)), 0.1, "full", logits=z)


@case(ValueError, r'logits/ref_logits are used only with kl_penalty="full" \(got \'kl\'\).*drop logits/ref_logits')
def ppo_compute_rewards_logits_ignored_outside_full_kl(env):
    from rljax.ppo import compute_rewards

    z = np.zeros((2, 3), np.float32)
    compute_rewards(np.zeros(2), z, z, np.ones((2, 3)), 0.1, "kl", logits=np.zeros((2, 3, 5)), ref_logits=np.zeros((2, 3, 5)))


@case(ValueError, r'kl_penalty="full" needs full log-prob distributions \[B, T, V\]')
def ppo_compute_rewards_full_kl_with_gathered_logprobs(env):
    from rljax.ppo import compute_rewards

    z = np.zeros((2, 3), np.float32)
    compute_rewards(np.zeros(2), z, z, np.ones((2, 3)), 0.1, "full")


@case(ValueError, "scores has 3 entries but batch_size is 2; pass one score per query/response pair")
def ppo_scores_wrong_count(env):
    from rljax.ppo import validate_scores

    validate_scores([1.0, 2.0, 3.0], 2)


@case(ValueError, r"scores must be 1-D \[batch_size\].*reshape\(-1\)")
def ppo_scores_two_dimensional(env):
    from rljax.ppo import validate_scores

    validate_scores(np.zeros((2, 2)), 2)


@case(ValueError, r"scores must be finite; got \[nan\] at indices \[1\]")
def ppo_scores_nan(env):
    from rljax.ppo import validate_scores

    validate_scores([1.0, float("nan")], 2)


@case(ValueError, r"scores\[0\] must be a scalar")
def ppo_scores_entry_not_scalar(env):
    from rljax.ppo import validate_scores

    validate_scores([np.zeros(3), np.zeros(3)], 2)


@case(ValueError, "scores must be real numbers")
def ppo_scores_strings(env):
    from rljax.ppo import validate_scores

    validate_scores(np.asarray(["a", "b"]), 2)


@case(ValueError, r"`batch_size` \(10\) must be a multiple of `mini_batch_size \* gradient_accumulation_steps`")
def ppo_config_batch_not_multiple(env):
    from rljax.ppo import PPOConfig

    PPOConfig(batch_size=10, mini_batch_size=4)


@case(ValueError, "PPOConfig.batch_size must be a positive integer")
def ppo_config_zero_batch(env):
    from rljax.ppo import PPOConfig

    PPOConfig(batch_size=0)


@case(ValueError, "PPOConfig.target must be positive with adap_kl_ctrl=True.*adap_kl_ctrl=False")
def ppo_config_adaptive_kl_without_target(env):
    from rljax.ppo import PPOConfig

    PPOConfig(adap_kl_ctrl=True, target=None)


@case(ValueError, r"PPOConfig.init_kl_coef must be a number \(use 0.0 for no KL penalty\)")
def ppo_config_kl_coef_none(env):
    from rljax.ppo import PPOConfig

    PPOConfig(init_kl_coef=None)


@case(ValueError, "PPOConfig.world_size must be positive")
def ppo_config_world_size_zero(env):
    from rljax.ppo import PPOConfig

    PPOConfig(world_size=0)


# --------------------------------------------------------------------------
# rljax.losses
# --------------------------------------------------------------------------


@case(ValueError, r"Logits .* and labels must have the same shape, got logits \(2, 5, 7\) and labels \(2, 4\)")
def losses_logps_shape_mismatch(env):
    from rljax.losses import get_batch_logps

    get_batch_logps(np.zeros((2, 5, 7), np.float32), np.zeros((2, 4), np.int32))


@case(ValueError, r"Unknown loss type: 'dpo'. Should be one of")
def losses_dpo_unknown_loss_type(env):
    from rljax.losses import dpo_loss

    z = np.zeros(2, np.float32)
    dpo_loss(z, z, z, z, beta=0.1, loss_type="dpo")


@case(ValueError, r"must have shape \[batch\] or \[batch, 1\], got \(2, 3\)")
def losses_reward_loss_per_token_rewards(env):
    from rljax.losses import reward_loss

    reward_loss(np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32))


# --------------------------------------------------------------------------
# rljax.generation
# --------------------------------------------------------------------------


def _generate(env, ids=None, mask=None, **kw):
    import jax

    from rljax.generation import generate

    module, params = env.lm
    ids = np.full((2, 4), 5, np.int32) if ids is None else ids
    mask = np.ones(np.shape(ids), np.int32) if mask is None else mask
    kw.setdefault("max_new_tokens", 2)
    kw.setdefault("eos_token_id", 1)
    kw.setdefault("pad_token_id", 0)
    return generate(module, params, ids, mask, jax.random.PRNGKey(0), **kw)


@case(ValueError, "max_new_tokens must be an int >= 1, got 0")
def gen_zero_new_tokens(env):
    _generate(env, max_new_tokens=0)


@case(ValueError, "temperature must be > 0 when do_sample=True.*pass do_sample=False")
def gen_temperature_zero(env):
    _generate(env, temperature=0.0)


@case(ValueError, r"top_p must be in \(0, 1\].*top_p=1.0")
def gen_top_p_zero(env):
    _generate(env, top_p=0.0)


@case(ValueError, r"top_k must be an int >= 0 \(0 turns it off\)")
def gen_top_k_negative(env):
    _generate(env, top_k=-1)


@case(ValueError, "min_new_tokens must be an int >= 0")
def gen_min_new_tokens_negative(env):
    _generate(env, min_new_tokens=-1)


@case(ValueError, "min_new_tokens=3 exceeds max_new_tokens=2.*lower min_new_tokens or raise max_new_tokens")
def gen_min_exceeds_max(env):
    _generate(env, min_new_tokens=3)


@case(ValueError, "eos_token_id is set but pad_token_id is None.*pad_token_id=tokenizer.eos_token_id")
def gen_eos_without_pad(env):
    _generate(env, pad_token_id=None)


@case(ValueError, r"input_ids must be 2-D \[batch, prompt_len\].*input_ids\[None\]")
def gen_one_dimensional_prompt(env):
    _generate(env, ids=np.full((4,), 5, np.int32))


@case(ValueError, "input_ids must hold integer token ids, got dtype float32")
def gen_float_token_ids(env):
    _generate(env, ids=np.full((2, 4), 5.0, np.float32))


@case(ValueError, "generation needs at least one prompt")
def gen_empty_batch(env):
    _generate(env, ids=np.zeros((0, 4), np.int32))


@case(ValueError, r"attention_mask shape \(2, 3\) must equal input_ids shape \(2, 4\)")
def gen_mask_shape_mismatch(env):
    _generate(env, mask=np.ones((2, 3), np.int32))


@case(ValueError, "exceeds the model's max_position_embeddings 32; truncate the prompt")
def gen_longer_than_positions(env):
    _generate(env, max_new_tokens=30)


@case(ValueError, r"right-padded .*padding_side = 'left'")
def gen_right_padded_prompts(env):
    _generate(env, mask=np.asarray([[1, 1, 1, 0], [1, 1, 1, 1]], np.int32))


@case(ValueError, r"attention_mask rows \[0\] have no real tokens")
def gen_prompt_without_tokens(env):
    _generate(env, mask=np.asarray([[0, 0, 0, 0], [1, 1, 1, 1]], np.int32))


@case(ValueError, r"input_ids holds ids \[128\] outside the model's vocabulary \[0, 128\)")
def gen_token_id_out_of_vocab(env):
    _generate(env, ids=np.asarray([[5, 5, 5, 128], [5, 5, 5, 5]], np.int32))


@case(ValueError, r"ids \[-100\] outside .*-100 is a label ignore index, not a token")
def gen_ignore_index_as_token(env):
    _generate(env, ids=np.asarray([[-100, 5, 5, 5], [5, 5, 5, 5]], np.int32), mask=np.asarray([[0, 1, 1, 1], [1] * 4]))


@case(ValueError, "return_values=True but the model's output has no .values.*value head")
def gen_values_without_value_head(env):
    _generate(env, return_values=True)


@case(ValueError, r"respond_to_batch needs a PRNG key: pass rng=jax.random.PRNGKey\(seed\)")
def gen_respond_to_batch_without_key(env):
    from rljax.generation import respond_to_batch

    module, params = env.lm
    respond_to_batch(module, params, np.full((2, 3), 5, np.int32), txt_len=2)


# --------------------------------------------------------------------------
# rljax.ppo_train.make_train (the functional loop)
# --------------------------------------------------------------------------


def _make_train(env, prompts=None, mask=None, reward=None, batch_size=2):
    import jax.numpy as jnp

    from rljax.generation import make_generate_fn
    from rljax.ppo import PPOConfig
    from rljax.ppo_train import make_train

    from rljax.ppo_train import PPOTrainState

    model = env.vmodel
    prompts = np.full((4, 3), 5, np.int32) if prompts is None else prompts
    mask = np.ones_like(prompts) if mask is None else mask
    reward = reward or (lambda _, r: r.response_mask.sum(-1).astype(jnp.float32))
    gen = make_generate_fn(model.module, max_new_tokens=2, pad_token_id=0, jit=False)
    config = PPOConfig(batch_size=batch_size, mini_batch_size=2)
    train = make_train(model.module, config, gen, reward, 1)
    state = PPOTrainState.create(model.params, model.params, config)
    return lambda run=train: run(state, None, prompts, mask)  # the bank is an argument of train


@case(ValueError, r"prompt_mask.*right-padded.*padding_side = 'left'")
def train_right_padded_prompt_bank(env):
    _make_train(env, mask=np.asarray([[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 1, 1]], np.int32))()


@case(ValueError, "The prompt bank has 4 prompts, fewer than batch_size=8")
def train_prompt_bank_smaller_than_batch(env):
    _make_train(env, batch_size=8)()


@case(ValueError, r"reward_fn must return one score per rollout row, shape \(2,\).*\.sum\(-1\)")
def train_reward_fn_per_token(env):
    import jax

    run = _make_train(env, reward=lambda _, r: r.response_mask.astype("float32"))
    jax.eval_shape(run)


# --------------------------------------------------------------------------
# PPOTrainer
# --------------------------------------------------------------------------


@case(ValueError, r"PPOTrainer needs a model: AutoModelForCausalLMWithValueHead.from_pretrained")
def ppo_trainer_without_model(env):
    from rljax.trainers.ppo import PPOTrainer

    PPOTrainer()


@case(ValueError, "lr_scheduler must be an optax schedule")
def ppo_trainer_lr_scheduler_not_callable(env):
    from rljax.ppo import PPOConfig
    from rljax.trainers.ppo import PPOTrainer

    PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2), env.vmodel, tokenizer=env.tok, lr_scheduler=0.1)


@case(ValueError, r"Batch size \(2\) does not match number of examples - but got 1 for: queries")
def ppo_step_wrong_number_of_queries(env):
    env.ppo_trainer().step([q(5, 6)], [q(7), q(8)], [1.0, 2.0])


@case(ValueError, "queries must be a list of 1-D token arrays")
def ppo_step_queries_not_a_list(env):
    env.ppo_trainer().step(np.full((2, 3), 5), [q(7), q(8)], [1.0, 2.0])


@case(ValueError, r"responses\[1\] has shape \(0,\); every entry must be a non-empty 1-D token array")
def ppo_step_empty_response(env):
    env.ppo_trainer().step([q(5, 6), q(5, 6)], [q(7), q()], [1.0, 2.0])


@case(ValueError, r"scores must be finite; got \[inf\]")
def ppo_step_infinite_score(env):
    env.ppo_trainer().step([q(5, 6), q(5, 6)], [q(7, 8), q(7, 8)], [1.0, float("inf")])


@case(ValueError, r"response_masks\[0\] has shape \(3,\), its response \(2,\)")
def ppo_step_mask_shape(env):
    env.ppo_trainer().step([q(5, 6), q(5, 6)], [q(7, 8), q(7, 8)], [1.0, 2.0], response_masks=[q(1, 1, 1), q(1, 1)])


@case(ValueError, "query/response token ids must be integers")
def ppo_step_float_token_ids(env):
    f = np.asarray([5.7, 6.2])
    env.ppo_trainer().step([f, f], [q(7, 8), q(7, 8)], [1.0, 2.0])


@case(ValueError, r"outside .*vocab")
def ppo_step_token_out_of_vocab(env):
    env.ppo_trainer().step([q(5, 6), q(5, 6)], [q(7, 500), q(7, 8)], [1.0, 2.0])


@case(ValueError, r"-100")
def ppo_step_ignore_index_in_response(env):
    env.ppo_trainer().step([q(5, 6), q(5, 6)], [q(7, -100), q(7, 8)], [1.0, 2.0])


@case(ValueError, r"max_position_embeddings|positions")
def ppo_step_longer_than_positions(env):
    long = np.full((30,), 5, np.int64)
    env.ppo_trainer().step([long, long], [q(7, 8, 9, 10), q(7, 8, 9, 10)], [1.0, 2.0])


@case(ValueError, r"expected a CausalLMWithValueHead module, got GPT2LMHeadModel")
def ppo_trainer_policy_without_value_head(env):
    from rljax.ppo import PPOConfig
    from rljax.trainers.ppo import PPOTrainer

    PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2), env.lm, tokenizer=env.tok)


@case(ValueError, "ref_model")
def ppo_trainer_reference_of_another_architecture(env):
    from rljax.models import init_params, model_from_config
    from rljax.models.gpt2 import GPT2Config
    from rljax.models.heads import AutoModelForCausalLMWithValueHead
    from rljax.ppo import PPOConfig
    from rljax.trainers.ppo import PPOTrainer
    import jax

    other = model_from_config(GPT2Config(vocab_size=128, n_positions=32, n_embd=8, n_layer=2, n_head=2))
    ref = AutoModelForCausalLMWithValueHead.from_lm(other, init_params(other, jax.random.PRNGKey(1)))
    PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2), env.vmodel, ref, tokenizer=env.tok)


@case(ValueError, r"float|integer")
def ppo_trainer_integer_params(env):
    import jax

    from rljax.models.heads import AutoModelForCausalLMWithValueHead
    from rljax.ppo import PPOConfig
    from rljax.trainers.ppo import PPOTrainer

    module, params = env.lm
    ints = jax.tree_util.tree_map(lambda x: x.astype("int32"), params)
    PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2), AutoModelForCausalLMWithValueHead.from_lm(module, ints), tokenizer=env.tok)


@case(ValueError, r"Unsupported generation kwargs \['num_beams'\]")
def ppo_generate_unsupported_kwarg(env):
    env.ppo_trainer().generate(q(5, 6), max_new_tokens=2, num_beams=4)


@case(ValueError, "Use max_new_tokens instead of max_length")
def ppo_generate_max_length(env):
    env.ppo_trainer().generate(q(5, 6), max_length=8)


@case(ValueError, r"min_length counts the prompt; pass min_new_tokens instead")
def ppo_generate_min_length(env):
    env.ppo_trainer().generate(q(5, 6), max_new_tokens=2, min_length=4)


# --------------------------------------------------------------------------
# TrainingArguments / SFTTrainer / RewardTrainer / DPOTrainer
# --------------------------------------------------------------------------


@case(ValueError, "per_device_train_batch_size must be >= 1, got 0")
def args_zero_batch(env):
    from rljax.trainers.base import TrainingArguments

    TrainingArguments(per_device_train_batch_size=0)


@case(ValueError, "learning_rate must be >= 0")
def args_negative_lr(env):
    from rljax.trainers.base import TrainingArguments

    TrainingArguments(learning_rate=-1e-3)


@case(ValueError, r"Unknown lr_scheduler_type 'cosine_annealing'; choose one of")
def args_unknown_schedule(env):
    from rljax.trainers.base import TrainingArguments

    TrainingArguments(lr_scheduler_type="cosine_annealing")


@case(ValueError, r"save_strategy must be 'no', 'steps' or 'epoch', got 'best'")
def args_unknown_save_strategy(env):
    from rljax.trainers.base import TrainingArguments

    TrainingArguments(save_strategy="best")


@case(ValueError, r"Unknown optim 'adam9'; choose one of")
def args_unknown_optim(env):
    from rljax.trainers.base import TrainingArguments

    TrainingArguments(optim="adam9")


@case(ValueError, "push_to_hub=True: rljax runs offline")
def args_push_to_hub(env):
    from rljax.trainers.base import TrainingArguments

    TrainingArguments(push_to_hub=True)


@case(ValueError, r"Unknown logging sink 'mlflow'")
def args_unknown_report_to(env):
    from rljax.trainers.base import TrainingArguments

    TrainingArguments(report_to=["mlflow"])


@case(TypeError, "fp16")
def args_fp16_is_not_silently_accepted(env):
    from rljax.trainers.base import TrainingArguments

    TrainingArguments(fp16=True)


def _sft(env, **kw):
    from rljax.trainers.sft import SFTTrainer

    kw.setdefault("train_dataset", texts())
    kw.setdefault("tokenizer", env.tok)
    kw.setdefault("dataset_text_field", "text")
    kw.setdefault("max_seq_length", 16)
    model = kw.pop("model", env.lm)
    return SFTTrainer(model, **kw)


@case(ValueError, "SFTTrainer needs a model")
def sft_without_model(env):
    _sft(env, model=None)


@case(ValueError, "SFTTrainer needs a tokenizer when the model is not a checkpoint path")
def sft_without_tokenizer(env):
    _sft(env, tokenizer=None)


@case(ValueError, "LoraConfig.r must be a positive int")
def sft_peft_config(env):
    _sft(env, peft_config={"r": 0})


@case(ValueError, "model_init_kwargs to the SFTTrainer. But your model is already instantiated")
def sft_model_init_kwargs_with_a_model_object(env):
    _sft(env, model_init_kwargs={"torch_dtype": "bfloat16"})


@case(ValueError, r"dataset_kwargs got unknown keys \['bogus'\]")
def sft_unknown_dataset_kwargs(env):
    _sft(env, dataset_kwargs={"bogus": 1})


@case(ValueError, "neftune_noise_alpha must be >= 0")
def sft_negative_neftune(env):
    _sft(env, neftune_noise_alpha=-1.0)


@case(ValueError, "max_seq_length must be >= 2")
def sft_zero_max_seq_length(env):
    _sft(env, max_seq_length=0)


@case(ValueError, "not compatible with the `packing` argument; set packing=False")
def sft_completion_collator_with_packing(env):
    from rljax.data import DataCollatorForCompletionOnlyLM

    _sft(env, packing=True, data_collator=DataCollatorForCompletionOnlyLM("Answer:", tokenizer=env.tok))


@case(ValueError, "didn't pass a `dataset_text_field` or `formatting_func`")
def sft_no_text_field(env):
    _sft(env, dataset_text_field=None)


@case(ValueError, "max_seq_length")
def sft_max_seq_length_holds_no_label(env):
    _sft(env, max_seq_length=1)


@case(ValueError, "train\\(\\) needs a non-empty train_dataset")
def sft_train_without_dataset(env):
    _sft(env, train_dataset=None, output_dir=env.path("sft_empty")).train()


@case(FileNotFoundError, r"resume_from_checkpoint: .*is not a directory")
def sft_resume_from_missing_directory(env):
    _sft(env, output_dir=env.path("sft_resume")).train(resume_from_checkpoint=env.path("nowhere"))


@case(FileNotFoundError, r"no checkpoint-<step>/train_state in .*save_steps")
def sft_resume_from_directory_without_checkpoints(env):
    os.makedirs(env.path("sft_nockpt"), exist_ok=True)
    _sft(env, output_dir=env.path("sft_nockpt")).train(resume_from_checkpoint=True)


@case(ValueError, r"The train dataset must have the columns .*missing")
def reward_missing_columns(env):
    from rljax.trainers.reward import RewardConfig, RewardTrainer

    RewardTrainer(env.lm, RewardConfig(max_length=16), train_dataset=[{"text": "x"}] * 4, tokenizer=env.tok)


@case(ValueError, "RewardTrainer needs a model")
def reward_without_model(env):
    from rljax.trainers.reward import RewardTrainer

    RewardTrainer(None, tokenizer=env.tok)


@case(ValueError, "needs a tokenizer")
def reward_collator_without_tokenizer(env):
    from rljax.trainers.reward import RewardTrainer

    RewardTrainer(env.lm, train_dataset=[{"input_ids_chosen": [1]}])


def _dpo(env, **kw):
    from rljax.trainers.dpo import DPOTrainer

    kw.setdefault("train_dataset", pairs())
    kw.setdefault("tokenizer", env.tok)
    kw.setdefault("max_length", 16)
    kw.setdefault("max_prompt_length", 8)
    return DPOTrainer(kw.pop("model", env.lm), **kw)


@case(ValueError, r"Unknown loss_type 'dpo'; choose one of")
def dpo_unknown_loss_type(env):
    _dpo(env, loss_type="dpo")


@case(ValueError, r"Unknown truncation_mode 'middle'")
def dpo_unknown_truncation_mode(env):
    _dpo(env, truncation_mode="middle")


@case(ValueError, "The ipo loss divides by beta; beta must be > 0")
def dpo_ipo_with_zero_beta(env):
    _dpo(env, loss_type="ipo", beta=0.0)


@case(ValueError, "decoder-only")
def dpo_encoder_decoder(env):
    _dpo(env, is_encoder_decoder=True)


@case(ValueError, "generate_during_eval=True is not supported")
def dpo_generate_during_eval(env):
    _dpo(env, generate_during_eval=True)


@case(ValueError, "tokenizer must be specified to tokenize a DPO dataset")
def dpo_without_tokenizer(env):
    _dpo(env, tokenizer=None)


@case(ValueError, r"DPO datasets need string columns 'prompt', 'chosen' and 'rejected'; missing \['rejected'\]")
def dpo_missing_column(env):
    _dpo(env, train_dataset=[{"prompt": "a", "chosen": "b"}] * 4)


@case(ValueError, "model_init_kwargs to the DPOTrainer, but your model is already instantiated")
def dpo_model_init_kwargs_with_a_model_object(env):
    _dpo(env, model_init_kwargs={"torch_dtype": "bfloat16"})


@case(ValueError, r"max_length.*max_prompt_length")
def dpo_max_length_not_above_prompt_length(env):
    _dpo(env, max_length=8, max_prompt_length=8)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _cli_exit(argv):
    """Run ``rljax.cli.main``; a usage error is SystemExit(2): re-raise it as ValueError with stderr."""
    import contextlib
    import io

    from rljax import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            cli.main(argv)
        except SystemExit as e:
            raise ValueError(f"exit {e.code}: {err.getvalue()}{e.code if isinstance(e.code, str) else ''}") from None


@case(ValueError, "unknown command 'train'")
def cli_unknown_command(env):
    _cli_exit(["train"])


@case(ValueError, "(?s)exit 2: .*not_a_flag")
def cli_unknown_flag(env):
    _cli_exit(["sft", "--not_a_flag", "1"])


@case(ValueError, r"exit 2: .*Unknown key\(s\) \['learnin_rate'\].*Valid keys")
def cli_yaml_unknown_key(env):
    path = env.path("bad.yaml")
    with open(path, "w") as f:
        f.write("learnin_rate: 3\n")
    _cli_exit(["sft", "--config", path])


@case(ValueError, "exit 2: .*must be a multiple")
def cli_ppo_invalid_batch(env):
    _cli_exit(["ppo", "--batch_size", "10", "--mini_batch_size", "4"])


@case(ValueError, "model_name_or_path")
def cli_sft_without_model(env):
    _cli_exit(["sft", "--dataset_name", env.path("none.jsonl"), "--output_dir", env.path("cli_sft")])


@case(ValueError, "`rljax ppo` needs --reward_model DIR")
def cli_ppo_without_reward_model(env):
    _cli_exit(["ppo", "--model_name_or_path", env.path("m"), "--dataset_name", env.path("d.jsonl"),
               "--output_dir", env.path("cli_ppo")])


@case(ValueError, "(?s)exit 2: .*--fp16")
def cli_fp16_flag_is_rejected(env):
    _cli_exit(["sft", "--fp16", "True"])


# --------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------


@case(ValueError, r"Pass overwrite=True .* or resume=True, not both")
def ckpt_overwrite_and_resume(env):
    from rljax.checkpoint import Checkpointer

    Checkpointer(env.path("ck_both"), overwrite=True, resume=True)


@case(ValueError, "save_interval_steps must be >= 1")
def ckpt_zero_interval(env):
    from rljax.checkpoint import Checkpointer

    Checkpointer(env.path("ck_interval"), save_interval_steps=0)


@case(ValueError, "max_to_keep must be >= 1 or None")
def ckpt_zero_keep(env):
    from rljax.checkpoint import Checkpointer

    Checkpointer(env.path("ck_keep"), max_to_keep=0)


@case(FileExistsError, r"is not empty .*Pass resume=True .* overwrite=True")
def ckpt_fresh_start_in_a_used_directory(env):
    from rljax.checkpoint import Checkpointer

    Checkpointer(env.ckpt_dir)


@case(FileExistsError, "Checkpoint step 1 already exists .*refusing to overwrite it")
def ckpt_save_existing_step(env):
    from rljax.checkpoint import Checkpointer

    with Checkpointer(env.ckpt_dir, resume=True, async_save=False) as ck:
        ck.save(1, small_state())


@case(ValueError, "restore needs target_state")
def ckpt_restore_without_template(env):
    from rljax.checkpoint import Checkpointer

    with Checkpointer(env.ckpt_dir, resume=True) as ck:
        ck.restore()


@case(ValueError, r"(?s)Could not restore .* into the given target_state.*same model config and optimizer")
def ckpt_restore_into_another_structure(env):
    import jax.numpy as jnp

    from rljax.checkpoint import Checkpointer

    with Checkpointer(env.ckpt_dir, resume=True) as ck:
        ck.restore(1, target_state={"w": jnp.ones((3, 3))})


@case(TypeError, r"extra values must be JSON types.*dataclasses.asdict")
def ckpt_extra_not_json(env):
    from rljax.checkpoint import Checkpointer

    with Checkpointer(env.path("ck_extra"), async_save=False) as ck:
        ck.save(1, small_state(), extra={"config": object()})


@case(FileNotFoundError, r"No committed checkpoint in .*only half-written saves")
def ckpt_nothing_committed(env):
    import warnings

    from rljax.checkpoint import Checkpointer

    d = env.path("ck_half")
    os.makedirs(os.path.join(d, "2.orbax-checkpoint-tmp"), exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Checkpointer(d, resume=True) as ck:
            ck.restore(target_state=small_state())


# --------------------------------------------------------------------------
# Model loaders
# --------------------------------------------------------------------------


@case((FileNotFoundError, OSError, ValueError), r"nowhere")
def load_missing_directory(env):
    from rljax.models import from_pretrained

    from_pretrained(env.path("nowhere"))


@case(ValueError, r"Unsupported model_type 'mamba'; rljax supports")
def load_unsupported_architecture(env):
    from rljax.models.hub import config_from_dict

    config_from_dict({"model_type": "mamba"})


@case(ValueError, "config.json has no 'model_type'")
def load_config_without_model_type(env):
    from rljax.models.hub import config_from_dict

    config_from_dict({"n_layer": 2})


@case(ValueError, "Got a model module without params: pass params=")
def load_module_without_params(env):
    from rljax.trainers.base import resolve_model

    resolve_model(env.lm[0])


@case(ValueError, r"Unknown dtype 'float8'")
def load_unknown_dtype(env):
    from rljax.models.hub import as_jax_dtype

    as_jax_dtype("float8")


# --------------------------------------------------------------------------
# Sharding, distributed, logging
# --------------------------------------------------------------------------


@case(ValueError, "At most one mesh axis may be -1")
def mesh_two_free_axes(env):
    from rljax.sharding import make_mesh

    make_mesh(-1, -1, 1)


@case(ValueError, "the sizes must multiply to the device count")
def mesh_wrong_device_count(env):
    import jax

    from rljax.sharding import make_mesh

    make_mesh(jax.device_count() + 1, 1, 1)


@case(ValueError, r"not a multiple of data x fsdp = .*pick a batch size divisible by")
def shard_batch_not_divisible(env):
    import jax

    from rljax.sharding import make_mesh, shard_batch

    if jax.device_count() < 2:
        raise ValueError("not a multiple of data x fsdp = 1; pick a batch size divisible by 1 (single device)")
    shard_batch({"x": np.zeros((jax.device_count() + 1, 2))}, make_mesh(-1, 1, 1))


@case(ValueError, r"process_id must be in \[0, 2\), got 5")
def distributed_bad_process_id(env):
    from rljax.distributed import initialize_distributed

    initialize_distributed(coordinator_address="localhost:1", num_processes=2, process_id=5)


@case(ValueError, "Global batch size 7 does not split evenly")
def distributed_uneven_batch(env):
    from unittest import mock

    from rljax import distributed

    with mock.patch.object(distributed.jax, "process_count", lambda: 2):
        distributed.local_batch_slice(7)


@case(ValueError, "sample_every must be >= 1")
def logging_sample_every_zero(env):
    from rljax.logging import MetricLogger

    MetricLogger(["stdout"], sample_every=0)


@case(ValueError, r"Sinks \['jsonl'\] write files: pass output_dir=")
def logging_file_sink_without_directory(env):
    from rljax.logging import MetricLogger

    MetricLogger(["jsonl"])


# --------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tiny_tokenizer, tmp_path_factory):
    return Env(tiny_tokenizer, tmp_path_factory.mktemp("bad_inputs"))


@pytest.mark.parametrize("call, exc, match", CASES)
def test_wrong_use_gives_a_clear_error(env, call, exc, match):
    with pytest.raises(exc, match=match):
        call(env)


def test_the_table_covers_at_least_60_wrong_uses():
    assert len(CASES) >= 60, len(CASES)


def test_sft_does_not_edit_the_users_tokenizer_silently(env):
    """A tokenizer without a pad token is not changed behind the user's back (or a warning says so)."""
    import copy
    import warnings

    tok = copy.deepcopy(env.tok)
    tok.pad_token = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _sft(env, tokenizer=tok)
    said_so = any("pad" in str(w.message).lower() for w in caught)
    assert tok.pad_token_id is None or said_so
