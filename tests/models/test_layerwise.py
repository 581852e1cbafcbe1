import torch

from lmshrink.models.arch import find_layers
from lmshrink.models.layerwise import run_layerwise


def test_layerwise_identity_reproduces_full_forward(tiny_llama):
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = tiny_llama.model(input_ids=ids).last_hidden_state
    seen = []
    last = {}

    def process(i, block, inputs):
        seen.append(i)
        last["inputs"] = inputs

    run_layerwise(tiny_llama, [{"input_ids": ids}], process)
    assert seen == [0, 1]
    # feed the last block's input through it and the final norm: equals the full model
    _, layers = find_layers(tiny_llama)
    with torch.no_grad():
        out = layers[-1](*last["inputs"][0].args, **last["inputs"][0].kwargs)
        out = tiny_llama.model.norm(out)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_layerwise_bert(tiny_bert):
    ids = torch.randint(0, 128, (2, 12))
    count = []
    run_layerwise(
        tiny_bert,
        [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}],
        lambda i, b, inp: count.append(inp[0].hidden.shape),
    )
    assert count == [torch.Size([2, 12, 64])] * 2
