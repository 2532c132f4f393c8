import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from engine.detokenizer import IncrementalDetokenizer
from engine.sampling_params import SamplingParams

CORPUS = ["héllo wörld 你好 🎉", "hello world, hello there", "the wörld says héllo", "你好 world 🎉🎉 done"] * 5
TEXTS = ["héllo wörld 你好 🎉", "你好 world 🎉🎉 done", "abc héllo 你好你好 🎉x wörld", "ÿ 𝄞 Ωmega 🎉🎉🎉!"]


@pytest.fixture(scope="module")
def tok():
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=270, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    t.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", clean_up_tokenization_spaces=False)


def stream(tok, ids, chunks=None, prompt="hi ", **kw):
    """Feeds ids in chunks (default: one by one); returns (detokenizer, deltas incl. flush)."""
    d = IncrementalDetokenizer(tok, tok.encode(prompt), SamplingParams(**kw))
    chunks = chunks or [1] * len(ids)
    deltas, pos = [], 0
    for n in chunks:
        deltas.append(d.add_tokens(ids[pos:pos + n]))
        pos += n
    deltas.append(d.flush())
    return d, deltas


def stop_oracle(tok, ids, stops):
    """Expected (text, stop, n_tokens) computed from full decodes of growing prefixes."""
    for k in range(1, len(ids) + 1):
        text = tok.decode(ids[:k])
        hits = [(text.find(s), s) for s in stops if s in text]
        if hits:
            i, s = min(hits)
            return text[:i], s, k
    return tok.decode(ids), None, len(ids)


def test_tokenizer_splits_characters(tok):
    ids = tok.encode(TEXTS[0])
    assert sum("\ufffd" in tok.decode([i]) for i in ids) >= 4
    assert "\ufffd" in tok.decode(ids[:1]) and tok.decode(ids[:1]).startswith("h")  # 'h' + half of 'é'


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunked", [False, True])
def test_roundtrip_never_breaks_utf8(tok, text, chunked):
    ids = tok.encode(text)
    chunks = None
    if chunked:
        rng = random.Random(len(text))
        chunks = [rng.randint(1, 3) for _ in ids]
    d, deltas = stream(tok, ids, chunks)
    assert "".join(deltas) == tok.decode(ids) == text == d.text
    assert not any("\ufffd" in x for x in deltas)
    assert d.token_ids == ids and d.stop_reason is None and not d.finished_by_stop


def test_complete_chars_released_before_partial_one(tok):
    ids = tok.encode(TEXTS[0])
    d = IncrementalDetokenizer(tok, [], SamplingParams())
    assert d.add_tokens(ids[:1]) == "h"        # 'h' + first byte of 'é'
    assert d.add_tokens(ids[1:2]) == "é"


def test_flush_releases_incomplete_tail_like_decode(tok):
    ids = tok.encode(TEXTS[0])[:1]             # ends mid-character
    d, deltas = stream(tok, ids)
    assert deltas[0] == "h" and "".join(deltas) == tok.decode(ids)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tok, skip):
    ids = tok.encode("héllo ") + [tok.eos_token_id] + tok.encode("wörld")
    d, deltas = stream(tok, ids, skip_special_tokens=skip)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
    assert ("<eos>" in d.text) is (not skip)


@pytest.mark.parametrize("text,stops", [
    ("héllo wörld 你好 🎉", ["wörld"]),           # stop spans several tokens (and split chars)
    ("héllo wörld 你好 🎉", ["你好 🎉"]),
    ("héllo wörld 你好 🎉", ["ö"]),               # single multi-byte char split over two tokens
    ("héllo wörld 你好 🎉", ["🎉", "wö", "好"]),   # earliest wins regardless of list order
    ("héllo wörld 你好 🎉", ["héllo"]),           # at the very beginning -> empty output
    ("héllo wörld 你好 🎉", ["h"]),
    ("abc héllo 你好你好 🎉x wörld", ["好你", "xyz"]),
    ("abc héllo 你好你好 🎉x wörld", ["wörld"]),   # at the very end
])
@pytest.mark.parametrize("chunk", [1, 2, 100])  # 100: all tokens in one add_tokens call
def test_stop_strings(tok, text, stops, chunk):
    ids = tok.encode(text)
    exp_text, exp_stop, n = stop_oracle(tok, ids, stops)
    assert exp_stop is not None
    chunks = [chunk] * len(ids)
    d, deltas = stream(tok, ids, chunks, stop=stops)
    assert "".join(deltas) == d.text == exp_text == text[:min(text.find(s) for s in stops if s in text)]
    assert d.finished_by_stop and d.stop_reason == exp_stop
    assert d.token_ids == ids[:n]
    assert not any("\ufffd" in x for x in deltas)


def test_stop_across_add_tokens_calls(tok):
    text, stop = "abc héllo 你好你好 🎉x wörld", "好你"
    ids = tok.encode(text)
    n = stop_oracle(tok, ids, [stop])[2]
    head = tok.decode(ids[:n - 1]).rstrip("\ufffd")
    assert any(head.endswith(stop[:j]) for j in range(1, len(stop)))  # the stop began in call 1
    d = IncrementalDetokenizer(tok, [], SamplingParams(stop=stop))
    first = d.add_tokens(ids[:n - 1])
    assert first == "abc héllo 你" and not d.finished_by_stop
    assert d.add_tokens(ids[n - 1:]) == "" and d.flush() == ""
    assert d.text == "abc héllo 你" and d.finished_by_stop and d.token_ids == ids[:n]
    assert d.add_tokens(ids[:2]) == "" and d.token_ids == ids[:n]


def test_holdback_released_on_flush(tok):
    text = "héllo wörld 你好 🎉"
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok, [], SamplingParams(stop=["🎉!", "你好 x"]))
    streamed = "".join(d.add_tokens([i]) for i in ids)
    assert streamed == text[:-1]               # '🎉' could still start '🎉!'
    assert streamed + d.flush() == text and not d.finished_by_stop


def test_holdback_only_possible_stop_prefixes(tok):
    ids = tok.encode("héllo wörld")
    d = IncrementalDetokenizer(tok, [], SamplingParams(stop="zzzzzz"))
    assert "".join(d.add_tokens([i]) for i in ids) == "héllo wörld"


ALPHABET = "ab héö你好🎉"


@settings(max_examples=150, deadline=None, derandomize=True)
@given(text=st.text(ALPHABET, min_size=1, max_size=30), stops=st.lists(st.text(ALPHABET, min_size=1, max_size=4),
       max_size=3), seed=st.integers(0, 1000))
def test_stop_streaming_property(tok, text, stops, seed):
    stops = [s for s in stops if not any(s != t and s in t for t in stops)]  # no stop inside another
    ids = tok.encode(text)
    rng = random.Random(seed)
    d, deltas = stream(tok, ids, [rng.randint(1, 4) for _ in ids], stop=stops)
    cut = min([text.find(s) for s in stops if s in text], default=len(text))
    assert "".join(deltas) == d.text == text[:cut]
    assert d.finished_by_stop is any(s in text for s in stops)
    assert d.token_ids == ids[:stop_oracle(tok, ids, stops)[2]]
    assert not any("\ufffd" in x for x in deltas)


@pytest.mark.parametrize("stops", [["ö", "wö"], ["wö", "ö"]])
def test_simultaneous_stops_earliest_start_wins(tok, stops):
    d, deltas = stream(tok, tok.encode("héllo wörld"), stop=stops)   # both complete with the 'ö' token
    assert "".join(deltas) == d.text == "héllo " and d.stop_reason == "wö"
