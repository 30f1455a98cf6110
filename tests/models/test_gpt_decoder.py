"""GPT.decoder (StaticKVDecoder): greedy decoding with a static key/value cache must give the
logits and tokens of the model's full forward on the growing sequence."""

from __future__ import annotations

import pytest
import torch

from nmsparse.app.models import StaticKVDecoder, create_model


def tiny_gpt(max_len: int = 16):
    return create_model("gpt_tiny", input_shape=(max_len,), num_classes=256,
                        task="language_model", n_layer=2, n_head=2, d_model=32).eval()


def test_step_matches_full_forward():
    model = tiny_gpt()
    decoder = model.decoder(12)
    assert isinstance(decoder, StaticKVDecoder)
    decoder.reset(token=7)
    sequence = [7]
    with torch.no_grad():
        for _ in range(12):
            logits = decoder.step()
            reference = model(torch.tensor([sequence]))[0, -1]
            torch.testing.assert_close(logits[0], reference, rtol=1e-4, atol=1e-5)
            sequence.append(int(reference.argmax()))
    assert decoder.tokens[0].tolist() == sequence[1:]
    assert decoder.generate(12, token=7) == [sequence[1:]]


def test_rows_decode_independently():
    model = tiny_gpt()
    starts = torch.tensor([3, 200, 41])
    rows = model.decoder(6, batch=3).generate(6, token=starts)
    for start, row in zip(starts.tolist(), rows, strict=True):
        assert model.decoder(6).generate(6, token=start) == [row]
        sequence = [start]
        with torch.no_grad():
            for _ in range(6):
                sequence.append(int(model(torch.tensor([sequence]))[0, -1].argmax()))
        assert row == sequence[1:]


def test_reset_replays_the_same_tokens():
    model = tiny_gpt()
    decoder = model.decoder(8)
    first = decoder.generate(8, token=5)
    assert decoder.generate(8, token=5) == first
    assert decoder.generate(3, token=5) == [first[0][:3]]


def test_bf16_decoder_follows_the_model_dtype():
    model = tiny_gpt().to(torch.bfloat16)
    decoder = model.decoder(4)
    assert decoder.keys.dtype == torch.bfloat16
    decoder.reset()
    with torch.no_grad():
        assert decoder.step().dtype == torch.bfloat16


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_len": 17}, "exceeds the model's maximum sequence length 16"),
    ({"max_len": 0}, "max_len must be a positive int"),
    ({"max_len": 4, "batch": 0}, "batch must be a positive int"),
])
def test_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_gpt().decoder(**kwargs)


def test_generate_checks_steps():
    decoder = tiny_gpt().decoder(4)
    with pytest.raises(ValueError, match=r"steps must be an int in 1..4"):
        decoder.generate(5)
