"""Hugging Face Llama checkpoints load into the llama block family with logits equal to transformers' own
implementation (a tiny random Llama built here; transformers is a test dependency only)."""

import json

import pytest
import torch

from conftest import assert_user_error, run_main
from production.core.errors import UserError
from production.model.hf import load_hf_llama
from production.model.rope import RopeScaling
from production.upcycle.surgery import upcycle

transformers = pytest.importorskip("transformers")

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}  # fmt: skip


def tiny_llama(tmp_path, tied: bool, kv_heads: int, rope_scaling=None, shard: bool = False):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=512, rope_theta=50000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=tied, rope_scaling=rope_scaling,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path, max_shard_size="60KB" if shard else "1GB")
    return model


@pytest.mark.parametrize(
    "tied,kv_heads,rope_scaling,shard", [(False, 2, LLAMA3, True), (True, 4, None, False), (False, 1, None, False)]
)
def test_logits_equal_transformers(tmp_path, tied, kv_heads, rope_scaling, shard):
    theirs = tiny_llama(tmp_path, tied, kv_heads, rope_scaling, shard)
    assert (tmp_path / "model.safetensors.index.json").exists() == shard
    ours = load_hf_llama(tmp_path)
    assert ours.cfg.attn_mode == ("gqa" if kv_heads < 4 else "standard") and ours.cfg.family == "llama"
    assert ours.cfg.tie_embeddings == tied and (ours.cfg.rope_llama3 is not None) == (rope_scaling is not None)
    ids = torch.randint(0, 300, (2, 200))  # past the original 64 positions: Llama 3's rescaling matters
    with torch.no_grad():
        want = theirs(ids).logits
        got, _ = ours(ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bad_directories_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_hf_llama(tmp_path)
    tiny_llama(tmp_path, True, 4)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(UserError, match="has no weights"):
        load_hf_llama(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(UserError, match="unsupported architecture 'GPTNeoXForCausalLM'; supported: LlamaForCausalLM"):
        load_hf_llama(tmp_path)


def test_upcycled_llama_at_full_rank_equals_transformers(tmp_path):
    """The exact start holds for a Hugging Face GQA Llama with Llama 3 RoPE too."""
    theirs = tiny_llama(tmp_path, False, 2, LLAMA3)
    ours = load_hf_llama(tmp_path)
    student, _ = upcycle(ours, torch.randint(0, 300, (2, 40)), sem=1, geo=ours.cfg.head_dim)
    assert student.cfg.family == "llama" and student.cfg.attn_mode == "decoupled" and student.cfg.kv_heads == 2
    ids = torch.randint(0, 300, (2, 150))
    with torch.no_grad():
        torch.testing.assert_close(student(ids)[0], theirs(ids).logits, atol=1e-5, rtol=1e-5)


def test_upcycle_refuses_a_teacher_of_another_vocabulary(tmp_path):
    tiny_llama(tmp_path / "llama", True, 4)
    proc = run_main("--mode", "upcycle", "--teacher", tmp_path / "llama", "--target-kv-ratio", "2", "--device", "cpu",
                    "--out-dir", tmp_path / "out")  # fmt: skip
    assert_user_error(proc, "vocabulary has 300 tokens but the data is GPT-2 tokens")
    assert not (tmp_path / "out").exists()


def test_rope_extensions_do_not_stack_on_llama3_rescaling(tmp_path):
    tiny_llama(tmp_path, False, 2, LLAMA3)
    model = load_hf_llama(tmp_path)
    with pytest.raises(UserError, match="does not stack"):
        model.set_rope_scaling(RopeScaling("yarn", 4.0, 64))
    model.set_rope_scaling(RopeScaling("none", 4.0, 64))  # no stretch: fine
