"""--optimizer muon: torch's Muon on the hidden matrices, AdamW on the rest, as one optimizer to the engine."""
import copy

import pytest
import torch

import tuneforge
from tuneforge import TrainConfig
from tuneforge.engine.muon import MuonWithAdamW, hidden_matrices
from tuneforge.engine.step import make_optimizer
from tuneforge.errors import ConfigError
from tuneforge.models.transformer import Transformer, model_config


def _model(seed=0):
    torch.manual_seed(seed)
    return Transformer(model_config("tiny:n_layers=2,d_model=32,n_heads=2,max_seq_len=32"))


def _train(model, opt, steps, seed=1):
    x = torch.randint(0, 200, (4, 17), generator=torch.Generator().manual_seed(seed))
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def test_hidden_matrices_are_the_linear_weights_but_not_the_lookups_or_the_tied_head():
    model = _model()
    hidden = hidden_matrices(model)
    linears = [m.weight for m in model.blocks.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and {id(w) for w in linears} == hidden
    for lookup in (model.tok_emb.weight, model.pos_emb.weight, model.lm_head.weight):
        assert id(lookup) not in hidden
    untied = Transformer(model_config("tiny:n_layers=1,d_model=32,n_heads=2,max_seq_len=32,tie_embeddings=false"))
    assert id(untied.lm_head.weight) not in hidden_matrices(untied)  # the head is a readout even when untied


def test_muon_moves_the_hidden_matrices_as_torchs_muon_and_the_rest_as_adamw():
    cfg = TrainConfig(lr=3e-3, optimizer="muon")
    ours, hand = _model(), _model()
    opt = make_optimizer(list(ours.parameters()), cfg, ours)
    assert isinstance(opt, MuonWithAdamW) and [type(o).__name__ for o in opt.parts] == ["Muon", "AdamW"]
    hidden = hidden_matrices(hand)
    muon = torch.optim.Muon([p for p in hand.parameters() if id(p) in hidden], lr=cfg.lr,
                            weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(
        [{"params": [p for p in hand.parameters() if p.dim() >= 2 and id(p) not in hidden],
          "weight_decay": cfg.weight_decay},
         {"params": [p for p in hand.parameters() if p.dim() < 2], "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)  # fused as the engine's: Muon's bfloat16 iterations
    # would turn float32 rounding differences of the two AdamW kernels into bfloat16 ones

    class Both:
        def step(self):
            muon.step()
            adamw.step()

        def zero_grad(self, set_to_none=True):
            muon.zero_grad(set_to_none=set_to_none)
            adamw.zero_grad(set_to_none=set_to_none)

    first = _train(ours, opt, 1)
    last = _train(ours, opt, 4)
    _train(hand, Both(), 5)
    for (name, a), b in zip(ours.named_parameters(), hand.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert last < first  # it learns


def test_the_state_dict_round_trips_in_torchs_format():
    model = _model()
    opt = make_optimizer(list(model.parameters()), TrainConfig(lr=3e-3, optimizer="muon"), model)
    _train(model, opt, 2)
    sd = opt.state_dict()
    n = len(list(model.parameters()))
    assert sorted(sd["state"]) == list(range(n))  # one numbering over both halves
    assert sorted(i for g in sd["param_groups"] for i in g["params"]) == list(range(n))
    twin = _model()
    twin.load_state_dict(model.state_dict())
    again = make_optimizer(list(twin.parameters()), TrainConfig(lr=3e-3, optimizer="muon"), twin)
    again.load_state_dict(copy.deepcopy(sd))  # torch's state_dict holds the live tensors, as a checkpoint would not
    _train(model, opt, 2, seed=2)
    _train(twin, again, 2, seed=2)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="parameter groups"):
        again.load_state_dict({**sd, "param_groups": sd["param_groups"][:1]})


def test_an_unknown_optimizer_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="adamw, muon"):
        TrainConfig.build({"optimizer": "sgd"}, source="tuneforge train")


def test_muon_is_refused_on_sharded_parameters():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    p.device_mesh = object()  # what FSDP2's DTensor parameters carry
    with pytest.raises(ConfigError, match="--strategy ddp"):
        make_optimizer([p], TrainConfig(optimizer="muon"), None)


def test_resuming_with_the_other_optimizer_is_refused_and_changes_nothing(tmp_path):
    common = dict(model="tiny:n_layers=1,d_model=32,n_heads=2,max_seq_len=32", mechanisms=["pretrain"], steps=2,
                  batch_size=4, eval_every=0,
                  out=str(tmp_path / "run"))
    tuneforge.train(**common)
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(ConfigError, match="with --optimizer adamw.*--init"):
        tuneforge.train(**{**common, "steps": 4}, resume="auto", optimizer="muon")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
