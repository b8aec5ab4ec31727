import numpy as np
import pytest
import torch

from production.core.errors import UserError
from production.data.corpus import clean_play, embedded_tokens
from production.data.files import LLMC_MAGIC, open_tokens
from production.data.splits import WindowSampler, fixed_batches, split_tokens
from production.data.tokenizer import get_tokenizer


def write_llmc_shard(path, tokens, magic=LLMC_MAGIC, version=1, count=None):
    header = np.zeros(256, dtype=np.int32)
    header[:3] = magic, version, len(tokens) if count is None else count
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())


def test_npy_bin_and_shard_folder_read_the_same_sequence(tmp_path):
    tokens = np.arange(5000, dtype=np.uint16)
    np.save(tmp_path / "t.npy", tokens)
    write_llmc_shard(tmp_path / "t.bin", tokens)
    shards = tmp_path / "shards"
    shards.mkdir()
    write_llmc_shard(shards / "part_000.bin", tokens[:1234])
    write_llmc_shard(shards / "part_001.bin", tokens[1234:4000])
    np.save(shards / "part_002.npy", tokens[4000:])
    for path, fmt in [(tmp_path / "t.npy", "npy"), (tmp_path / "t.bin", "bin"), (shards, "shards(3)")]:
        stream, got_fmt = open_tokens(path)
        assert got_fmt == fmt and len(stream) == 5000
        np.testing.assert_array_equal(stream.window(1200, 100), np.arange(1200, 1300))  # spans a shard boundary
        np.testing.assert_array_equal(stream.slice(3990, 4010).window(0, 20), np.arange(3990, 4010))


def test_split_is_90_10_in_order_and_windows_are_fixed(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(10_000, dtype=np.uint16))
    stream, fmt = open_tokens(tmp_path / "t.npy")
    splits = split_tokens(stream, "t.npy", fmt, block_size=16, vocab_size=50257)
    assert (len(splits.train), len(splits.val)) == (9000, 1000)
    assert splits.val.window(0, 1)[0] == 9000
    assert splits.info["n_tokens"] == 10_000 and splits.info["val_tokens"] == 1000
    a = fixed_batches(splits.val, 16, 4, 5)
    assert a == fixed_batches(splits.val, 16, 4, 5) and len(a) == 5 and all(len(b) == 4 for b in a)
    assert a[0][0] == 0 and a[-1][-1] == 1000 - 17  # evenly spread over the whole split


def test_sampler_is_seeded_and_resumable(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(10_000, dtype=np.uint16))
    stream, _ = open_tokens(tmp_path / "t.npy")
    s1 = WindowSampler(stream, 8, 3, seed=7)
    first = s1.next_batch()
    state = s1.state_dict()
    x2, y2 = s1.next_batch()
    s2 = WindowSampler(stream, 8, 3, seed=123)
    s2.load_state_dict(state)
    x3, y3 = s2.next_batch()
    assert torch.equal(x2, x3) and torch.equal(y2, y3)
    assert torch.equal(first[0][:, 1:], first[1][:, :-1])  # targets are inputs shifted by one
    assert first[0].dtype == torch.int64 and first[0].shape == (3, 8)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda d: np.save(d / "x.npy", np.zeros(5000, dtype=np.float32)), "float32"),
        (lambda d: np.save(d / "x.npy", np.full(5000, 60000, dtype=np.uint16)), "60000 >= vocab_size"),
        (lambda d: np.save(d / "x.npy", np.zeros(100, dtype=np.uint16)), "too short"),
        (lambda d: np.save(d / "x.npy", np.zeros((50, 100), dtype=np.uint16)), "1-D"),
        (lambda d: write_llmc_shard(d / "x.bin", np.zeros(5000), magic=1234), "magic"),
        (lambda d: write_llmc_shard(d / "x.bin", np.zeros(5000), count=6000), "truncated"),
        (lambda d: (d / "x.txt").write_text("hello"), "must end in .npy"),
    ],
)
def test_bad_data_is_a_clear_error(tmp_path, make, match):
    make(tmp_path)
    path = next(tmp_path.iterdir())
    with pytest.raises(UserError, match=match):
        stream, fmt = open_tokens(path)
        split_tokens(stream, str(path), fmt, block_size=64, vocab_size=50257)


def test_missing_path_says_how_to_make_it(tmp_path):
    with pytest.raises(UserError, match="prepare_fineweb.py"):
        open_tokens(tmp_path / "fineweb_100m.npy")


def test_embedded_corpus_is_real_text_tokenized_once(tmp_path):
    path, description = embedded_tokens(tmp_path)
    assert "shakespeare" in description
    tokens = np.load(path, mmap_mode="r")
    assert tokens.dtype == np.uint16 and len(tokens) > 1_000_000
    assert tokens[0] == 50256 and (tokens == 50256).sum() >= 30  # one EOT per play
    text = get_tokenizer().decode(tokens[:400].tolist())
    assert "ACT I" in text and "**" not in text
    mtime = path.stat().st_mtime_ns
    assert embedded_tokens(tmp_path)[0] == path and path.stat().st_mtime_ns == mtime  # cached, not rebuilt


def test_clean_play_strips_markdown_only():
    md = "# Hamlet\n\n**BERNARDO**  \nWho's there?\n\n_Enter HORATIO_\n"
    assert clean_play(md) == "Hamlet\n\nBERNARDO\nWho's there?\n\nEnter HORATIO\n"
