"""The quality suite: task generators, reach caps, the leak flag, the model, and the CLI."""

import json

import pytest
import torch

import attnlab
from attnlab import cli
from attnlab.bench.quality import metrics, policies, report, tasks
from attnlab.bench.quality.model import RecallModel, param_count, state_bytes, static_mask
from attnlab.bench.quality.train import Schedule, fit


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not spin against other processes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _answers_match(d: tasks.TaskData):
    """At every scored position the label is the token at the answer position, before it."""
    s = tasks.scored(d)
    rows, pos = s.nonzero(as_tuple=True)
    ans = d.answer[rows, pos]
    assert (ans >= 0).all() and (ans < pos).all()
    assert torch.equal(d.inputs[rows, ans], d.labels[rows, pos])
    assert (d.answer[~s] == -1).all() and (d.slice_[~s] == -1).all()


def test_mqar_follows_the_zoology_rule():
    L, N, V = 64, 6, 256
    d = tasks.mqar(300, 5, seq_len=L, pairs=N, vocab=V)
    s = tasks.scored(d)
    _answers_match(d)
    assert (s.sum(1) == N).all()  # labels only at the N query positions
    keys, values = d.inputs[:, 0 : 2 * N : 2], d.inputs[:, 1 : 2 * N : 2]
    assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
    assert all(len(set(r.tolist())) == N for r in keys)  # distinct keys per sequence
    rows, pos = s.nonzero(as_tuple=True)
    assert (pos >= 2 * N).all() and ((pos - 2 * N) % 2 == 0).all()  # the query region, even offsets
    assert torch.equal(d.inputs[rows, pos - 0].view(300, N).sort(1).values, keys.sort(1).values)  # each key once
    assert torch.equal(d.inputs[rows, d.answer[rows, pos] - 1], d.inputs[rows, pos])  # value follows its key
    fillers = d.inputs[:, 2 * N :][~s[:, 2 * N :]]
    assert fillers.unique().numel() > V // 2  # random fillers over the whole vocabulary


def test_mqar_gaps_follow_the_power_law():
    """The first key's gap g is drawn with probability proportional to (g+1)^(a-1)."""
    L, N, a = 128, 8, 0.01
    d = tasks.mqar(4000, 11, seq_len=L, pairs=N, vocab=2048, alpha=a)
    first = (d.labels[:, 2 * N :] != -100).float().argmax(1)  # offset of the earliest query
    gap0 = ((d.answer == 1).float().argmax(1) - 2 * N) // 2  # key 1 (its value sits at 1): drawn first
    w = (torch.arange((L - 2 * N) // 2, dtype=torch.float64) + 1) ** (a - 1)
    p = w / w.sum()
    emp = torch.bincount(gap0, minlength=len(w)).double() / 4000
    assert (emp[:4] - p[:4]).abs().max() < 0.03
    assert emp[:8].sum() > 0.5 and (first < 16).float().mean() > 0.6  # clustered right after the KV block


def test_mqar_distractors_are_never_queried():
    N, D = 4, 12
    d = tasks.mqar(200, 3, seq_len=128, pairs=N, vocab=1024, distractors=D)
    _answers_match(d)
    s = tasks.scored(d)
    assert (s.sum(1) == N).all() and (d.answer[s] < 2 * (N + D)).all()
    asked = ((d.answer.clamp(min=0) - 1) // 2)[s].view(200, N)
    assert all(len(set(r.tolist())) == N for r in asked) and asked.max() >= N  # a subset, not the first N


def test_passkey_and_selective_copy_answers():
    p = tasks.passkey(200, 1, seq_len=64)
    _answers_match(p)
    assert (tasks.scored(p).sum(1) == 2).all() and (p.inputs[:, -2] == 255).all()
    assert (p.inputs[torch.arange(200), p.answer[:, -2] - 1] == 254).all()  # the needle's marker
    assert 0 <= p.slice_.max() <= 100 and p.slice_[:, -1].float().std() > 10  # depths spread
    c = tasks.selective_copy(200, 2, seq_len=64, copies=8, vocab=16)
    _answers_match(c)
    s = tasks.scored(c)
    assert (s.sum(1) == 8).all() and (c.answer[s].view(200, 8).diff(dim=1) > 0).all()  # copied in order
    assert ((c.inputs[:, :56] != 14).sum(1) == 8).all()  # 8 data tokens among blanks


def test_regression_targets_are_the_linear_map():
    d = tasks.linear_regression(50, 4, points=12, dim=3)
    x, y = d.inputs[:, 0::2, :3], d.inputs[:, 1::2, 3]
    w = torch.linalg.lstsq(x, y.unsqueeze(-1)).solution  # recover each sequence's w from its tokens
    assert torch.allclose(x @ w, y.unsqueeze(-1), atol=1e-4)
    s = tasks.scored(d)
    assert torch.equal(d.labels[s].view(50, 11), y[:, 1:]) and torch.equal(d.slice_[0][s[0]], torch.arange(1, 12))


def test_train_and_test_never_overlap_and_are_deterministic():
    train_seed, test_seed = tasks.split_seeds(0)
    assert train_seed != test_seed and tasks.split_seeds(1)[1] == test_seed
    train = tasks.mqar(2000, train_seed, seq_len=32, pairs=2, vocab=64, random_fillers=False)
    test = tasks.mqar(500, test_seed, seq_len=32, pairs=2, vocab=64, random_fillers=False)
    assert tasks.overlap(train, test) < 5  # tiny space (fillers off): collisions are chance only
    again = tasks.mqar(500, test_seed, seq_len=32, pairs=2, vocab=64, random_fillers=False)
    assert torch.equal(test.inputs, again.inputs) and tasks.overlap(test, again) == 500
    big = tasks.mqar(1000, train_seed, seq_len=128, pairs=8, vocab=2048)
    assert tasks.overlap(big, tasks.mqar(300, test_seed, seq_len=128, pairs=8, vocab=2048)) == 0
    with pytest.raises(ValueError, match="seed"):
        tasks.split_seeds(-1)


def test_reach_cap_on_a_hand_made_case():
    mask = attnlab.mask("sliding_window", 8, 8, causal=True, window=2)[0, 0]  # query q sees q-1 and q
    answer = torch.full((2, 8), -1)
    scored = torch.zeros(2, 8, dtype=torch.bool)
    # row 0: q=5 answer 4 (seen), q=7 answer 2 (not seen: 2 and 3 out of the window)
    # row 1: q=6 answer 4 (4 is out, but 5 = p + 1 holds key and value in its conv window: seen)
    for r, q, p in ((0, 5, 4), (0, 7, 2), (1, 6, 4)):
        answer[r, q], scored[r, q] = p, True
    hit = metrics.reachable(mask, answer, scored)
    assert hit[0, 5] and not hit[0, 7] and hit[1, 6]
    assert metrics.reach_cap(mask, answer, scored) == pytest.approx((0.5 + 1.0) / 2)  # per example, then mean


def test_reach_caps_match_the_spec_table():
    """spec/quality.md §5.2: L=128, N=8 caps 0.327 / 0.586 / 0.813 at windows 16 / 32 / 64."""
    d = tasks.mqar(1000, tasks.split_seeds(0)[1], seq_len=128, pairs=8, vocab=2048)
    for w, spec in ((16, 0.327), (32, 0.586), (64, 0.813)):
        cap = metrics.reach_cap(static_mask("sliding_window", 128, {"window": w}), d.answer, tasks.scored(d))
        assert abs(cap - spec) < 0.025
    assert metrics.reach_cap(static_mask("dense", 128, {}), d.answer, tasks.scored(d)) == 1.0


def test_leak_flag_fires_above_cap(capsys):
    assert metrics.leaks(0.70, 0.586) and not metrics.leaks(0.60, 0.586) and not metrics.leaks(0.99, None)
    row = {"task": "T3", "difficulty": "w=32", "label": "sliding_window(window=32)", "value": 0.9, "cap": 0.586}
    row |= {"leak": metrics.leaks(0.9, 0.586), "metric": "accuracy", "dim": 64, "params": 1, "state_bytes": 8}
    row |= {"best_lr": 3e-3, "slice_name": "distance", "slices": [{"lo": 0, "hi": 8, "value": 1.0, "cap": 1.0}]}
    (line,) = report.leak_lines([row, {**row, "value": 0.59, "leak": False}])
    assert line.startswith("LEAK: sliding_window(window=32) on T3 w=32: accuracy 0.900 > reach cap 0.586")
    report.table([row], [], {"cpu": "x", "threads": 1, "torch": "t"})
    assert "LEAK" in capsys.readouterr().out


def test_model_head_runs_on_scored_positions_only():
    model = RecallModel(100, "sliding_window", {"window": 4}, dim=16)
    seen = []
    model.head.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    x = torch.randint(0, 100, (3, 20))
    scored = torch.zeros(3, 20, dtype=torch.bool)
    scored[0, 5] = scored[2, 7] = scored[2, 19] = True
    out, aux, routes = model(x, scored)
    assert out.shape == (3, 100) and seen == [torch.Size([3, 16])] and aux == 0 and routes is None
    assert torch.allclose(out, model.head(model.hidden(x)[0][scored]))
    assert model.mixers[0].causal is True and param_count(model) == sum(p.numel() for p in model.parameters())
    reg = RecallModel(None, "dense", dim=16, in_features=5, out_features=1)
    assert reg(torch.randn(2, 6, 5), torch.ones(2, 6, dtype=torch.bool)).logits.shape == (12, 1)


def test_state_bytes_follow_the_mask():
    assert state_bytes("dense", 128, 64, 1, {}) == 2 * 128 * 64 * 4
    assert state_bytes("sliding_window", 128, 64, 1, {"window": 16}) == 2 * 16 * 64 * 4
    assert state_bytes("streaming", 128, 64, 1, {"sinks": 4, "window": 16}) == 2 * 20 * 64 * 4
    assert static_mask("block_topk", 64, {}) is None  # data-dependent: full cache, no cap
    assert state_bytes("block_topk", 64, 32, 1, {}) == 2 * 64 * 32 * 4


def test_training_is_deterministic_and_learns():
    train = tasks.mqar(512, 0, seq_len=12, pairs=1, vocab=16)
    test = tasks.mqar(64, tasks.split_seeds(0)[1], seq_len=12, pairs=1, vocab=16)
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = RecallModel(16, "dense", dim=32)
        results.append(fit(model, train, test, Schedule(lr=3e-2, epochs=4, batch=32), seed=0))
    assert results[0]["score"] == results[1]["score"] and results[0]["steps"] == results[1]["steps"]
    assert results[0]["score"] > 0.9 and results[0]["stop"] in ("target", "budget")  # chance: 1/8


def test_cli_quality_smoke(tmp_path, capsys):
    args = ["bench", "--suite", "quality", "--smoke", "--threads", "1", "--tasks", "T1", "T3", "--out", str(tmp_path)]
    assert cli.main([*args, "--mechanisms", "dense", "sliding_window"]) == 0
    (run,) = tmp_path.iterdir()
    doc = json.loads((run / "quality.json").read_text())
    rows = doc["rows"]
    assert {(r["task"], r["mechanism"]) for r in rows} == {
        ("T1", "dense"),
        ("T1", "sliding_window"),
        ("T3", "sliding_window"),
    }
    assert [r["options"]["window"] for r in rows if r["task"] == "T3"] == [16, 32, 64]
    for r in rows:
        assert 0 <= r["value"] <= 1 and r["params"] > 0 and r["state_bytes"] > 0 and r["leak"] is False
        assert r["cap"] == 1.0 if r["mechanism"] == "dense" else r["cap"] < 1.0
        assert r["train_test_overlap"] == 0 and r["settings"]["vocab"] == 2048 and r["slices"]
    out = capsys.readouterr().out
    assert "T3" in out and ("quality.png" in out or "matplotlib is not installed" in out)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--mechanisms", "nope"], "invalid choice: 'nope'"),
        (["--mechanisms"], "expected at least one argument"),
        (["--tasks"], "expected at least one argument"),
        (["--tasks", "T9"], "invalid choice: 'T9'"),
        (["--policies", "nope"], "invalid choice: 'nope'"),
    ],
)
def test_cli_bad_input_is_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--suite", "quality", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(["bench", "--suite", "quality", "--smoke", "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnlab bench: error: cannot write results to --out") and err.count("\n") == 1


def test_cli_policies_need_the_quality_suite(capsys):
    assert cli.main(["bench", "--suite", "efficiency", "--policies", "sala"]) == 2
    err = capsys.readouterr().err
    assert "--policies applies to the quality suite" in err and err.count("\n") == 1


def test_policy_models_follow_their_policy():
    from attnlab.nn.router import RoutedAttention

    L = 32
    for name, build in policies.POLICIES.items():
        policy = build(L)
        model = RecallModel(16, policy, dim=16)
        assert len(model.mixers) == len(policy) == policies.DEPTH
        for layer, mixer in zip(policy.layers, model.mixers):
            assert isinstance(mixer, RoutedAttention) == (layer.route is not None)
            inner = mixer.attn if layer.route is not None else mixer
            assert inner.mechanism == layer.mechanism and inner.rope is None  # no positions, as the suite
        x = torch.randint(0, 16, (3, L))
        out, aux, routes = model(x, torch.ones(3, L, dtype=torch.bool))
        assert (routes is not None) == (name == "flux") and (routes is None or routes.shape == (3, policies.DEPTH))
        assert out.shape == (3 * L, 16) and torch.isfinite(out).all()
        assert (aux > 0) == (name == "flux"), name  # routers start dense: |1 - z - 0.5| = 0.5
        (out.sum() + aux).backward()
    reg = RecallModel(None, policies.policy_at("flux", 12), dim=16, in_features=5, out_features=1)
    assert reg(torch.randn(2, 12, 5), torch.ones(2, 12, dtype=torch.bool)).logits.shape == (24, 1)  # ICL inputs
    described = policies.describe(policies.policy_at("sala", 128))
    assert described == "lightning,lightning,lightning,block_topk"
    assert policies.describe(policies.policy_at("hylra", 128)) == "block_topk,block_topk<-0,block_topk<-0,block_topk<-0"
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        policies.policy_at("nope", 128)


def test_hylra_policy_model_selects_once_per_forward(monkeypatch):
    from attnlab.mechanisms import block_topk

    calls = []
    real = block_topk._rank_by_score  # called once per select(); the record holds select itself
    monkeypatch.setattr(block_topk, "_rank_by_score", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    model = RecallModel(16, policies.policy_at("hylra", 32), dim=16)
    model(torch.randint(0, 16, (2, 32)), torch.ones(2, 32, dtype=torch.bool))
    assert len(calls) == 1  # layer 0 selects, layers 1-3 reuse its selection


def test_policy_selection_by_preset():
    assert policies.select(None, "quick", False) == []
    assert policies.select(None, "full", False) == list(policies.POLICIES)
    assert policies.select(None, "full", True) == []  # mechanisms picked by hand: only those
    assert policies.select(["flux", "flux"], "quick", True) == ["flux"]


def test_cli_quality_smoke_with_policies(tmp_path, capsys):
    args = ["bench", "--suite", "quality", "--smoke", "--threads", "1", "--tasks", "T1", "--out", str(tmp_path)]
    assert cli.main([*args, "--policies", "sala", "lightning-x4", "flux"]) == 0
    (run,) = tmp_path.iterdir()
    doc = json.loads((run / "quality.json").read_text())
    assert doc["policies"] == ["sala", "lightning-x4", "flux"] and doc["mechanisms"] == []
    rows = {r["mechanism"]: r for r in doc["rows"]}
    linear_state = 64 * 65 * 4  # one head of d=64: phi(k)^T v and z
    assert rows["lightning-x4"]["state_bytes"] == 4 * linear_state
    assert rows["sala"]["state_bytes"] == 3 * linear_state + 2 * 128 * 64 * 4  # + block_topk's full cache
    assert [x["mechanism"] for x in rows["sala"]["policy"]["layers"]] == ["lightning"] * 3 + ["block_topk"]
    assert rows["sala"]["cap"] is None and rows["sala"]["label"].startswith("sala[")
    assert rows["sala"]["sparse_share"] is None  # no routers
    assert 0 <= rows["flux"]["sparse_share"] <= 1 and "sparse)" in capsys.readouterr().out


def test_cli_quality_with_nothing_to_train_says_why(tmp_path, capsys):
    args = ["bench", "--suite", "quality", "--smoke", "--tasks", "T3", "--out", str(tmp_path)]
    assert cli.main([*args, "--policies", "sala"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnlab bench: error: nothing to train") and "sala: not in T3" in err
    assert err.count("\n") == 1


def test_policy_model_refuses_loose_options():
    with pytest.raises(ValueError, match="options go into the policy"):
        RecallModel(16, policies.policy_at("sala", 32), {"window": 4}, dim=16)


def test_plan_says_what_runs_and_why_the_rest_is_skipped():
    from attnlab.bench.quality.catalog import DataCache
    from attnlab.bench.quality.plan import Untrainable, plan, trainable_options

    with pytest.raises(Untrainable, match="gate network"):  # moh's record: untrainable as a bare mixer
        trainable_options("moh", 128)
    with pytest.raises(Untrainable, match="no reach option"):
        trainable_options("dense", 128, reach=16)
    assert trainable_options("sliding_window", 128, reach=16)["window"] == 16
    jobs, notes = plan(["moh", "dense", "sliding_window"], "quick", ["T1", "T3"], DataCache(), smoke=True)
    assert [(j.point.task, j.name) for j in jobs] == [("T1", "dense"), ("T1", "sliding_window")] + [
        ("T3", "sliding_window")
    ] * 3
    assert [j.opts["window"] for j in jobs if j.point.task == "T3"] == [16, 32, 64]
    assert any(n.startswith("moh (T1 L=128 N=8 V=2048, d=64): skipped: routed heads") for n in notes)


def test_data_cache_shares_the_test_set_across_seeds():
    from attnlab.bench.quality.catalog import DataCache, points

    (point,) = points("quick", ["T1"], smoke=True)
    data = DataCache()
    train0, test0 = data(point, 0)
    train1, test1 = data(point, 1)
    assert data(point, 0)[0] is train0 and test1 is test0  # generated once; one test set for all seeds
    assert not torch.equal(train0.inputs, train1.inputs)
    assert len(train0.inputs) == point.train_n == 128 and len(test0.inputs) == point.test_n == 64


def test_the_loop_reports_progress_through_a_listener(tmp_path, capsys):
    from attnlab.bench.quality import run

    class Record(run.Listener):
        def __init__(self):
            self.total, self.done, self.started, self.rows = None, 0, [], []

        def start(self, total_steps):
            self.total = total_steps

        def run_started(self, job, lr, seed):
            self.started.append((job.label, lr, seed))

        def advance(self, steps=1):
            self.done += steps

        def job_done(self, row):
            self.rows.append(row)

    rec = Record()
    rows, _ = run.run(["dense"], "quick", ["T1"], smoke=True, listener=rec)
    assert rec.rows == rows and rec.started == [("dense", 3e-3, 0)] and rec.done == rec.total == 2
    # the new spelling of the CLI runs the same loop (the old one: test_cli_quality_smoke)
    args = ["bench", "quality", "--smoke", "--tasks", "T1", "--mechanisms", "dense", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    (out,) = tmp_path.iterdir()
    (row,) = json.loads((out / "quality.json").read_text())["rows"]
    assert row["value"] == rows[0]["value"] and row["label"] == "dense"
