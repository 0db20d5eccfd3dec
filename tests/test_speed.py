"""The benchmark harness (benchmarks/): FLOP counts, the paper's networks, the workers, and the
authors' code driven the way their trainer drives it (skipped when decolle==0.2 is absent)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import _harness as H  # noqa: E402


def test_flops_of_the_dvsgesture_network_are_counted_per_layer():
    rows = H.layer_macs(H.NETWORKS["dvsgesture"])
    assert [r["synapse_macs"] for r in rows] == [
        32 * 32 * 64 * 2 * 49,  # 7x7 conv at full resolution, before the pool of 2
        16 * 16 * 128 * 64 * 49,
        16 * 16 * 128 * 128 * 49,
    ]
    assert [r["neurons"] for r in rows] == [64 * 16 * 16, 128 * 16 * 16, 128 * 8 * 8]
    assert [r["readout_macs"] for r in rows] == [n * 11 for n in (16384, 32768, 8192)]
    f = H.flops_per_sample_step(H.NETWORKS["dvsgesture"])
    syn = sum(r["synapse_macs"] for r in rows)
    ro = sum(r["readout_macs"] for r in rows)
    assert f["infer"] == 2 * (syn + ro)
    assert f["train_decolle"] == 2 * f["infer"]  # forward + weight gradient + dL/dS through G
    assert f["train_3x"] == 3 * f["infer"] - 2 * rows[0]["synapse_macs"]


def test_nmnist_network_adds_a_dense_layer_of_ten():
    rows = H.layer_macs(H.NETWORKS["nmnist"])
    assert len(rows) == 4
    assert rows[3]["synapse_macs"] == 128 * 8 * 8 * 10


def test_paper_network_builds_with_the_documented_shapes():
    net = H.NETWORKS["dvsgesture"]
    network, _, rule = H.build_ours(net)
    shape, got = net.input_shape, []
    for layer in network.layers:
        shape = layer.output_shape(shape)
        got.append(tuple(shape))
    assert got == [(64, 16, 16), (128, 16, 16), (128, 8, 8)]
    assert [r.g.shape for r in network.readouts] == [(11, 16384), (11, 32768), (11, 8192)]


def test_speed_worker_measures_our_inference_in_process():
    from benchmarks import speed

    r = speed.worker({"kind": "ours", "net": "dvsgesture", "mode": "infer", "batch": 1,
                      "target_s": 0.01, "threads": torch.get_num_threads()})
    assert r["steps"] >= 5 and r["sample_steps_per_s"] > 0 and r["cpu_s"] > 0


def test_worker_result_line_round_trips(capsys):
    H.emit({"a": 1.5})
    line = capsys.readouterr().out.strip()
    assert line.startswith(H.RESULT_TAG) and line.endswith('{"a": 1.5}')


def test_summary_reports_median_and_spread():
    s = H.summarise([3.0, 1.0, 2.0, float("nan")])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)
    assert s["spread"] == pytest.approx(1.0)
    assert H.summarise([])["median"] is None


def test_memory_skips_points_predicted_too_large():
    from benchmarks.memory import _extrapolate

    assert _extrapolate([], 100) is None
    assert _extrapolate([(50, 100.0)], 100) == pytest.approx(200.0)
    assert _extrapolate([(50, 100.0), (100, 200.0)], 400) == pytest.approx(800.0)
    assert _extrapolate([(50, 100.0), (100, 90.0)], 400) == pytest.approx(90.0)  # flat, not negative


def test_machine_description_names_cpu_torch_and_threads():
    m = H.machine_info(2)
    assert m["torch"] == torch.__version__ and m["threads"] == 2 and m["cpu_model"]


@pytest.mark.oracle
@pytest.mark.skipif(not H.authors_available()[0], reason="decolle==0.2 (the authors' code) not installed")
def test_authors_network_trains_online_like_their_train_loop():
    net = H.NETWORKS["dvsgesture"]
    model, optimizer, loss_fn = H.build_authors(net)
    assert len(model) == 3
    x = H.random_events(1, 2, net.input_shape)
    target, mask = H.authors_targets(H.random_labels(1, net.n_classes), 2, net.n_classes)
    w0 = model.LIF_layers[2].base_layer.weight.detach().clone()
    model.init(x, 0)
    H.authors_train_steps(model, optimizer, loss_fn, x, target, mask)
    assert not torch.equal(w0, model.LIF_layers[2].base_layer.weight)
    H.authors_infer_steps(model, loss_fn, x, target)


def test_small_network_is_the_documented_size_and_takes_the_closed_form():
    net = H.NETWORKS["small"]
    network, _, rule = H.build_ours(net)
    assert sum(p.numel() for p in network.parameters()) == 3640
    assert sum(r["neurons"] for r in H.layer_macs(net)) == 1792
    assert rule.uses_closed_form()
    assert not H.build_ours(net, closed_form=False)[2].uses_closed_form()


@pytest.mark.filterwarnings("error::RuntimeWarning")  # ours_compiled must not fall back to eager
@pytest.mark.parametrize("kind", ["ours", "ours_autograd", "ours_compiled"])
def test_speed_worker_measures_online_training_of_every_path(kind):
    from benchmarks import speed

    r = speed.worker({"kind": kind, "net": "small", "mode": "train", "batch": 2,
                      "target_s": 0.01, "threads": torch.get_num_threads()})
    assert r["steps"] >= 5 and r["sample_steps_per_s"] > 0


def test_memory_worker_sees_decolle_flat_and_bptt_growing_in_t():
    import sys as _sys

    from benchmarks import memory

    if not _sys.platform.startswith("linux"):
        pytest.skip("the training-memory figure reads /proc/self (Linux)")
    grow = {}
    for rule in ("decolle", "bptt"):
        grow[rule] = [memory.worker({"net": "small", "rule": rule, "batch": 2, "steps": t, "threads": 1})
                      ["training_growth_mb"] for t in (20, 200)]
    assert abs(grow["decolle"][1] - grow["decolle"][0]) < 2.0  # MB: nothing kept per step
    assert grow["bptt"][1] > grow["bptt"][0] + 10.0  # the graph of 180 more steps


def test_precision_summary_pairs_seeds_and_gives_their_spread():
    from benchmarks.precision import summarise, table

    def row(seed, precision, last):
        return {"config": "default", "seed": seed, "precision": precision, "test_accuracy": [0.5, last],
                "wall_time_s": 10.0, "maxrss_mb": None}

    rows = [row(0, "fp32", 0.90), row(0, "bf16", 0.92), row(1, "fp32", 0.80), row(1, "bf16", 0.79),
            row(2, "fp32", 0.85), row(2, "bf16", 0.85)]
    (s,) = summarise(rows, ["fp32", "bf16"])
    assert s["paired_difference"]["pairs"] == pytest.approx([0.02, -0.01, 0.0])
    assert s["paired_difference"]["mean"] == pytest.approx(0.01 / 3)
    assert s["per_precision"]["fp32"]["mean"] == pytest.approx(0.85)
    assert s["per_precision"]["fp32"]["std"] == pytest.approx(0.05)  # sample std of 0.9, 0.8, 0.85
    text = table(rows, [s], ["fp32", "bf16"])
    assert "85.00 % (5.00)" in text and "+2.00, -1.00, +0.00" in text


def test_no_change_score_of_parallel_streams_is_the_mean_of_their_scores():
    from benchmarks.stream_scenarios import no_change_accuracy
    from threefactor.stream.sources import MotionStream, ParallelStreams, Scenario

    streams = [MotionStream(seed, 20, 20, downsample=2, scenario=Scenario(label_fraction=0.5)) for seed in (1, 2, 3)]
    each = [no_change_accuracy(s, 30) for s in streams]
    assert len(set(each)) > 1  # different streams, different scores: the mean is not trivially one of them
    assert no_change_accuracy(ParallelStreams(streams), 30) == pytest.approx(sum(each) / 3)
