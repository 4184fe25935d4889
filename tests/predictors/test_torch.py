from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tileseg.errors import ConfigError, ModelError  # noqa: E402
from tileseg.predictors import CallablePredictor, Predictor, load_predictor  # noqa: E402
from tileseg.predictors.torch import TorchPredictor, clear_cache  # noqa: E402
from tileseg.predictors.unet import UNet  # noqa: E402

CFG = {"in_channels": 1, "out_channels": 2, "spatial_dims": 2, "depth": 3, "base_features": 4}


@pytest.fixture
def net():
    torch.manual_seed(0)
    m = UNet(**CFG)
    # non-trivial batch-norm statistics so a wrong load would show
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


@pytest.fixture
def batch():
    return np.random.default_rng(0).normal(size=(3, 1, 32, 48)).astype(np.float32)


def _reference(module, batch):
    with torch.no_grad():
        return module(torch.from_numpy(batch)).numpy()


def _save_script(module, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(module).save(str(path))
    return path


def test_torchscript_round_trip_matches_module(net, batch, tmp_path):
    path = _save_script(net, tmp_path / "net.pt")
    ref = _reference(net, batch)
    for spec in (str(path), path, {"torchscript": str(path)}):
        p = load_predictor(spec, device="cpu")
        out = p(batch)
        assert out.dtype == np.float32 and out.shape == (3, 2, 32, 48)
        np.testing.assert_allclose(out, ref, atol=1e-5)
        assert (p.in_channels, p.out_channels, p.size_divisor) == (1, 2, 4)
        assert p.receptive_field == (26, 26)
    np.testing.assert_allclose(load_predictor(net)(batch), ref, atol=1e-6)


def test_traced_model_channels_from_conv_weights(tmp_path, batch):
    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Conv2d(1, 5, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(5, 3, 1)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.trace(seq, torch.zeros(1, 1, 8, 8)).save(str(tmp_path / "t.pt"))
    p = load_predictor(tmp_path / "t.pt")
    assert (p.in_channels, p.out_channels) == (1, 3)
    np.testing.assert_allclose(p(batch), _reference(seq, batch), atol=1e-5)
    eager = load_predictor(seq)
    assert (eager.in_channels, eager.out_channels) == (1, 3)


def test_state_dict_loaded_with_weights_only(net, batch, tmp_path):
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    torch.save({"epoch": 3, "state_dict": net.state_dict()}, tmp_path / "ckpt.pt")
    ref = _reference(net, batch)
    for name in ("sd.pt", "ckpt.pt"):
        p = load_predictor({"state_dict": {"path": str(tmp_path / name), "architecture": {"unet": CFG}}})
        np.testing.assert_allclose(p(batch), ref, atol=1e-6)
        assert (p.in_channels, p.out_channels) == (1, 2)


def _sd(path, config=None):
    """A ``state_dict`` model spec for the test U-Net."""
    return {"state_dict": {"path": str(path), "architecture": {"unet": config or CFG}}}


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_weights_only_refuses_arbitrary_pickles(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(ModelError, match=r"evil\.pt.*weights_only"):
        load_predictor(_sd(path))


def test_corrupt_or_missing_files_name_the_file(net, tmp_path):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"\x00not a zip archive" * 50)
    with pytest.raises(ModelError, match="corrupt.pt"):
        load_predictor(_sd(bad))
    with pytest.raises(ModelError, match="corrupt.pt"):
        load_predictor(str(bad))
    with pytest.raises(ModelError, match="missing.pt"):
        load_predictor(tmp_path / "missing.pt")
    # a valid state_dict file is not a TorchScript file: the error says what to do
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ModelError, match=r"sd\.pt.*state_dict"):
        load_predictor(tmp_path / "sd.pt")
    with pytest.raises(ModelError, match=r"sd\.pt.*does not fit"):
        load_predictor(_sd(tmp_path / "sd.pt", {**CFG, "out_channels": 3}))


def test_wrong_channel_count(net, tmp_path):
    p = load_predictor(_save_script(net, tmp_path / "net.pt"))
    with pytest.raises(ModelError, match="model expects 1 input channels, image has 3"):
        p(np.zeros((1, 3, 32, 32), np.float32))

    class Functional(torch.nn.Module):  # no conv module: channels unknown until torch fails
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(2, 4, 3, 3))

        def forward(self, x):
            return torch.nn.functional.conv2d(x, self.w, padding=1)

    q = load_predictor(Functional())
    assert q.in_channels is None
    assert q(np.zeros((1, 4, 8, 8), np.float32)).shape == (1, 2, 8, 8)
    with pytest.raises(ModelError, match="model expects 4 input channels, image has 3"):
        q(np.zeros((1, 3, 8, 8), np.float32))


def test_bad_patch_size_and_output_shape(net):
    p = load_predictor(net)
    with pytest.raises(ModelError, match="divisible by 4"):
        p(np.zeros((1, 1, 30, 32), np.float32))
    shrink = load_predictor(torch.nn.Conv2d(1, 1, 3))  # no padding: output smaller than the patch
    with pytest.raises(ModelError, match="does not match input"):
        shrink(np.zeros((1, 1, 8, 8), np.float32))


def test_pickling_path_predictor_leaves_weights_behind(net, tmp_path, batch):
    clear_cache()
    path = _save_script(net, tmp_path / "net.pt")
    size = path.stat().st_size
    p = load_predictor(path)
    blob = pickle.dumps(p)
    assert len(blob) < 2000 < size
    q = pickle.loads(blob)
    assert q.module is p.module  # same process: served from the per-process cache
    assert load_predictor(str(path)).module is p.module
    np.testing.assert_allclose(q(batch), p(batch))
    # a changed file is reloaded
    os.utime(path, ns=(time.time_ns(), p_mtime := path.stat().st_mtime_ns + 10**9))
    assert path.stat().st_mtime_ns == p_mtime
    assert load_predictor(path).module is not p.module
    # state_dict predictors are also rebuilt from the file, not pickled
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    a = load_predictor(_sd(tmp_path / "sd.pt"))
    assert len(pickle.dumps(a)) < 2000
    assert pickle.loads(pickle.dumps(a)).module is a.module


def test_in_memory_module_pickles_with_its_weights(net, batch):
    p = load_predictor(net)
    n_bytes = sum(t.numel() * 4 for t in net.state_dict().values() if t.is_floating_point())
    blob = pickle.dumps(p)
    assert len(blob) > n_bytes
    np.testing.assert_allclose(pickle.loads(blob)(batch), p(batch), atol=1e-6)


def _worker_run(blob, batch):
    p = pickle.loads(blob)
    out = p(batch)
    again = pickle.loads(blob)
    return out, id(p.module) == id(again.module), os.getpid()


@pytest.mark.slow
def test_predictor_in_another_process(net, batch, tmp_path):
    import multiprocessing as mp

    path = _save_script(net, tmp_path / "net.pt")
    blob = pickle.dumps(load_predictor(path))
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        out, same, pid = pool.submit(_worker_run, blob, batch).result(timeout=120)
    assert pid != os.getpid()
    assert same  # loaded once in the worker, reused by the second predictor copy
    np.testing.assert_allclose(out, _reference(net, batch), atol=1e-5)


def test_forwards_are_serialised_per_device(batch):
    state = {"active": 0, "max": 0}
    guard = threading.Lock()

    class Slow(torch.nn.Module):
        def forward(self, x):
            with guard:
                state["active"] += 1
                state["max"] = max(state["max"], state["active"])
            time.sleep(0.02)
            with guard:
                state["active"] -= 1
            return x * 2

    p = load_predictor(Slow(), device="cpu")
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(p, [batch] * 8))
    assert state["max"] == 1
    for o in outs:
        np.testing.assert_array_equal(o, batch * 2)
    state["max"] = 0
    q = TorchPredictor(Slow(), device="cpu", serialize=False)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(q, [batch] * 8))
    assert state["max"] > 1


class _Threads(torch.nn.Module):
    """Records the thread each forward runs on."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def forward(self, x):
        self.names.append(threading.current_thread().name)
        return x * 2


def test_serialised_cpu_forwards_run_on_one_model_thread(batch):
    """Whichever thread asks, serialised CPU forwards run on one thread of their own, so their activations
    come from one malloc arena; errors (and ModelError conversion) reach the caller; serialize=False
    forwards run where they are called."""
    m = _Threads()
    p = load_predictor(m, device="cpu")
    with ThreadPoolExecutor(3, thread_name_prefix="dask-like") as pool:
        outs = list(pool.map(p.predict_tensor, [batch] * 6))
    for o in outs:
        np.testing.assert_array_equal(o.numpy(), batch * 2)
    assert len(set(m.names)) == 1 and m.names[0].startswith("tileseg-model-cpu")
    with pytest.raises(ModelError, match="input channels"):
        load_predictor(net_for_channels(), device="cpu")(np.zeros((1, 3, 8, 8), np.float32))
    q = TorchPredictor(_Threads(), device="cpu", serialize=False)
    with ThreadPoolExecutor(2, thread_name_prefix="dask-like") as pool:
        list(pool.map(q, [batch] * 4))
    assert all(n.startswith("dask-like") for n in q.module.names)


def net_for_channels():
    """A one-channel convolution: a three-channel batch fails inside the forward."""
    return torch.nn.Conv2d(1, 2, 3, padding=1)


def _forward_in_child(blob: bytes, batch: np.ndarray) -> np.ndarray:
    return pickle.loads(blob)(batch)


def test_model_thread_after_fork(batch):
    """A forked child (a ``processes`` pool) does not inherit the parent's model thread: it starts its own."""
    import multiprocessing as mp

    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork on this platform")
    p = load_predictor(_Threads(), device="cpu")
    p(batch)  # the parent's model thread exists now
    with ProcessPoolExecutor(1, mp_context=mp.get_context("fork")) as pool:
        out = pool.submit(_forward_in_child, pickle.dumps(p), batch).result(timeout=120)
    np.testing.assert_array_equal(out, batch * 2)


def test_predict_tensor_keeps_the_output_on_the_device(net, batch):
    """The tensor path the stitching uses gives what ``__call__`` gives, as a float32 tensor."""
    p = load_predictor(net, device="cpu", precision="bf16")
    t = p.predict_tensor(batch)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu"
    np.testing.assert_array_equal(t.numpy(), p(batch))
    q = load_predictor(net, device="cpu")
    np.testing.assert_allclose(q.predict_tensor(batch).numpy(), _reference(net, batch), atol=1e-5)
    with pytest.raises(ModelError, match="input channels"):
        q.predict_tensor(np.zeros((1, 3, 32, 48), np.float32))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_precision(net, batch, precision):
    p = load_predictor(net, precision=precision, device="cpu")
    out = p(batch)
    assert out.dtype == np.float32
    ref = _reference(net, batch)
    np.testing.assert_allclose(out, ref, atol=0.1 * np.abs(ref).max())
    assert p.describe()["precision"] == precision


def test_spec_errors_and_passthrough(net, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown model kind 'keras'.*installed: exported, onnx, python, state_dict"):
        load_predictor({"keras": "model.h5"})
    with pytest.raises(ConfigError, match=r"exactly one model kind.*'state_dict', 'torchscript'"):
        load_predictor({"state_dict": {}, "torchscript": "x.pt"})
    with pytest.raises(ConfigError, match="did you mean 'torchscript'"):
        load_predictor({"torchscipt": {"path": "x.pt"}})
    with pytest.raises(ConfigError, match=r"model.state_dict.architecture: unknown architecture 'unnet'"):
        load_predictor({"state_dict": {"path": "w.pt", "architecture": {"unnet": CFG}}})
    with pytest.raises(ConfigError, match=r"model.torchscript: .*(missing .*'path'|unknown parameter 'pth')"):
        load_predictor({"torchscript": {"pth": "x.pt"}})
    with pytest.raises(ConfigError, match=r"model.torchscript: unknown parameter 'layot'.*did you mean 'layout'"):
        load_predictor({"torchscript": {"path": "x.pt", "layot": "NHWC"}})
    with pytest.raises(ConfigError, match="precision"):
        load_predictor(net, precision="fp8")
    with pytest.raises(ConfigError, match="cannot make a model"):
        load_predictor(42)
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ConfigError, match="unet"):
        load_predictor(_sd(tmp_path / "sd.pt", {**CFG, "depth": 9}))
    custom = CallablePredictor(lambda b: b, in_channels=1, out_channels=1)
    assert load_predictor(custom) is custom
    fn = load_predictor(lambda b: b[:, :1] + 1)
    assert isinstance(fn, Predictor)
    np.testing.assert_array_equal(fn(np.zeros((1, 2, 4, 4), np.float32)), np.ones((1, 1, 4, 4)))


def test_state_dict_spec_with_device(net, batch, tmp_path):
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    p = load_predictor(_sd(tmp_path / "sd.pt"), device="cpu")
    assert p.describe()["device"] == "cpu" and p.describe()["architecture"] == "unet"
    np.testing.assert_allclose(p(batch), _reference(net, batch), atol=1e-6)


def test_import_does_not_load_torch():
    code = ("import sys, tileseg.predictors as p; assert 'torch' not in sys.modules; "
            "p.load_predictor(lambda b: b); assert 'torch' not in sys.modules; print('ok')")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a process without a GPU")
def test_cuda_spec_is_checked_on_cpu_in_a_gpu_less_client(net, tmp_path):
    """A client without a GPU can still build (and check) a predictor meant for GPU workers."""
    path = _save_script(net, tmp_path / "net.pt")
    p = load_predictor(path, device="cuda")
    assert (p.in_channels, p.out_channels) == (1, 2)
    assert len(pickle.dumps(p)) < 2000
    with pytest.raises(ModelError, match=r"net\.pt"):
        p(np.zeros((1, 1, 32, 32), np.float32))  # this process really has no CUDA device
    with pytest.raises(ModelError, match="missing.pt"):
        load_predictor(tmp_path / "missing.pt", device="cuda")


@pytest.mark.parametrize("dims, shape", [(2, (256, 320)), (3, (64, 64, 64))])
def test_committed_demo_models_segment_blobs(dims, shape):
    """The shipped demo weights load through load_predictor and segment fresh synthetic data."""
    from tileseg.preprocess import zscore
    from tileseg.testing.synthetic import blobs_2d, blobs_3d, dice

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(root, "examples", "models", f"unet{dims}d.pt")
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    assert os.path.getsize(path) < 500 * 1024
    p = load_predictor(path, device="cpu")
    assert (p.in_channels, p.out_channels) == (1, 2)
    img, lab = (blobs_2d if dims == 2 else blobs_3d)(shape, seed=12345)
    x = zscore(img[None]).compute()[None]
    pred = p(x)[0].argmax(0)
    assert dice(pred, lab) > 0.9


def test_plain_callable_returning_a_tensor_that_requires_grad():
    """A user's function calling a module outside inference mode: detached, same labels as the module itself."""
    import tileseg
    from tileseg.predictors.torch import TorchPredictor

    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 3, 1))
    x = np.random.default_rng(2).random((50, 44), dtype=np.float32)

    def fn(batch):
        return net(torch.from_numpy(batch))  # grad tracking on: out.requires_grad

    assert fn(x[None, None, :16, :16]).requires_grad
    kw = dict(patch_size=(16, 16), overlap=0.5, chunks=24, output="logits")
    got = tileseg.segment(x, fn, **kw).data.compute()
    ref = tileseg.segment(x, TorchPredictor(net.eval(), device="cpu"), **kw).data.compute()
    np.testing.assert_allclose(got, ref, atol=1e-5)
