"""HoliTom's inner-LLM merge against a reference written here from its official code path (our own transcription,
not a copy): cokeshao/HoliTom ``holitom/modeling_qwen2.py::Qwen2Model_holitom.forward``, the block at
``layer_idx == HOLITOM_k``: head-mean last-token attention of layer K-1 over the image span, top
round(L (1 - r)), cosine of the others to the kept, then the sequential pairwise merge loop. Compared on fixed
signals (LLaVA-OneVision 32 x 196 + 1 after the outer stage's 25 % / 10 %, and tiny sizes) and through the engine.
"""
import pytest
import torch

from conftest import noise_image
from tokensieve.pruners import StageInput, get_pruner
from tokensieve.pruners import holitom_llm as hl

QUESTION = "what appeared first"


def official_holitom_llm(hidden, attn, r=0.5):
    """hidden [1, L, D] the image span's hidden states entering layer K, attn [H, L] layer K-1's last-token row
    over it -> (kept indices sorted, hidden states of the kept [k, D])."""
    length = hidden.shape[1]
    avg = attn.mean(dim=0)
    # the official ``topk``; ties (none in these signals) left open there, the lower index here
    top = torch.sort(avg, descending=True, stable=True).indices[:round(length * (1 - r))]
    all_indices = torch.arange(length)
    non_topk = all_indices[~torch.isin(all_indices, top)]
    non_topk_states, topk_states = hidden[:, non_topk, :], hidden[:, top, :]
    dot = torch.bmm(non_topk_states, topk_states.transpose(1, 2))
    sim = dot / (torch.norm(non_topk_states, dim=-1, keepdim=True) * torch.norm(topk_states, dim=-1, keepdim=True).transpose(1, 2))
    _, idx = torch.max(sim, dim=-1)
    hidden = hidden.clone()
    for b in range(hidden.size(0)):
        for i in range(len(non_topk)):
            t = top[idx[b, i]]
            hidden[b, t, :] = (hidden[b, t, :] + hidden[b, non_topk[i], :]) / 2
    keep = top.sort().values
    return keep.tolist(), hidden[0, keep]


def signals(n, d=64, h=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.rand(h, n, generator=g).softmax(-1)


def run(x, attn, keep):
    return get_pruner("holitom_llm").select(StageInput(tokens=x, keep=keep, coords=torch.zeros(x.shape[0], 3), attn=attn))


@pytest.mark.parametrize("n,r", [(32 * 196 // 4 + 1, 0.5), (32 * 196 // 10 + 1, 0.5), (8 * 196 // 4, 0.3), (33, 0.5),
                                 (64, 0.75)])
def test_holitom_llm_keeps_and_merges_as_the_official_block(n, r):
    x, attn = signals(n, seed=n)
    ref, ref_h = official_holitom_llm(x[None], attn, r)
    sel = run(x, attn, round(n * (1 - r)))
    assert sel.keep_idx.tolist() == ref
    torch.testing.assert_close(sel.tokens, ref_h, atol=1e-5, rtol=1e-5)
    members = torch.bincount(sel.groups, minlength=len(ref))
    assert int(members.max()) > 2  # some kept token absorbs several: the order of the pairwise merge matters


def test_a_plain_mean_fails_the_comparison(monkeypatch):
    x, attn = signals(401, seed=1)
    ref, ref_h = official_holitom_llm(x[None], attn, 0.5)

    def plain_mean(x, kept):  # the cluster mean instead of the sequential halving
        merged, target = real(x, kept)
        sums = torch.zeros_like(merged).index_add_(0, target, x.float())
        return sums / torch.bincount(target, minlength=kept.numel())[:, None], target

    real = hl.pairwise_merge
    monkeypatch.setattr(hl, "pairwise_merge", plain_mean)
    sel = run(x, attn, len(ref))
    assert sel.keep_idx.tolist() == ref
    assert not torch.allclose(sel.tokens, ref_h, atol=1e-5, rtol=1e-5)


def test_holitom_llm_through_the_engine_after_the_outer_stage(engine_for, monkeypatch):
    """Tiny LLaVA-OneVision video: holitom outside, then holitom_llm at layer 1; the stage's own inputs (layer 1's
    hidden states of the surviving video tokens, layer 0's last-token row) through the transcription."""
    engine = engine_for("llava_onevision")
    frames = [noise_image(80 + i) for i in range(8)]
    caught = []
    real = hl.HoliTomLLMPruner.select
    monkeypatch.setattr(hl.HoliTomLLMPruner, "select", lambda self, inp: caught.append((inp, real(self, inp)))
                        or caught[-1][1])
    res = engine.generate(QUESTION, video=frames, plan="holitom:keep=13;holitom_llm:layer=1,keep=0.5",
                          max_new_tokens=1)
    inp, sel = caught[0]
    assert inp.tokens.shape[0] == 13
    ref, ref_h = official_holitom_llm(inp.tokens.float()[None], inp.attn.float(), 0.5)
    assert sel.keep_idx.tolist() == ref and len(ref) == round(13 * 0.5)
    torch.testing.assert_close(sel.tokens.float(), ref_h, atol=1e-5, rtol=1e-5)
    assert res.kept[1].tolist() == res.kept[0][torch.tensor(ref)].tolist()
