"""The profile summary of `genscale bench train --profile`: kinds of real kernel names, interval
unions and per-iteration figures against hand-computed values."""
import pytest

from trainer.bench_profile import format_profiles, kind_of, summarise, union_us

# Names as torch.profiler reports them on CUDA (cuDNN, cuBLAS, CUTLASS, Triton, ATen) and on the CPU.
NAMES = {
    "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroupsize1x1x1": "matmul/conv",
    "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT": "matmul/conv",
    "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x2_nn_align8>(...)": "matmul/conv",
    "void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false, true>(...)": "matmul/conv",
    "triton_poi_fused_convolution_leaky_relu_mul_0": "triton (compiled)",
    "triton_red_fused__native_batch_norm_legit_functional_1": "triton (compiled)",
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4, false, false, cutlass::bfloat16_t>>(...)": "attention",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>(...)": "optimizer",
    "void at::native::batch_norm_collect_statistics_kernel<at::native::InvStd, float, float, float, int>(...)": "normalization",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float, float, float, float>, unsigned int, float, 4>>(...)": "reduction",
    "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::{lambda(float)#1}>>(...)": "copy/cast",
    "void at::native::(anonymous namespace)::CatArrayBatchedCopy<float, unsigned int, 4, 64, 64>(...)": "copy/cast",
    "Memcpy HtoD (Pageable -> Device)": "copy/cast",
    "void at::native::vectorized_elementwise_kernel<4, at::native::(anonymous namespace)::leaky_relu_kernel(at::TensorIteratorBase&, c10::Scalar const&)::{lambda()#1}::operator()() const::{lambda(float)#1}, std::array<char*, 2ul>>(int, ...)": "elementwise",
    "void at::native::unrolled_elementwise_kernel<at::native::convert_kernel_fn, std::array<char*, 2ul>>(...)": "elementwise",
    "aten::convolution_backward": "matmul/conv",
    "aten::native_batch_norm": "normalization",
    "aten::_foreach_add_": "optimizer",
    "aten::leaky_relu": "elementwise",
    "aten::copy_": "copy/cast",
    "aten::sum": "reduction",
    "cudaLaunchKernel": "other",
}


@pytest.mark.parametrize("name", list(NAMES))
def test_kind_of_real_kernel_names(name):
    assert kind_of(name) == NAMES[name]


def test_union_counts_overlap_once():
    assert union_us([]) == 0
    assert union_us([(0, 10), (5, 15), (20, 25), (21, 22), (30, 30)]) == 15 + 5
    assert union_us([(20, 25), (0, 10)]) == 15


def test_summary_per_iteration_by_hand():
    records = [("gemm_a", 300.0), ("gemm_a", 300.0), ("triton_poi_fused_add_0", 100.0), ("Memset (Device)", 50.0),
               ("gemm_a", 250.0), ("triton_poi_fused_add_0", 100.0)]
    s = summarise(records, busy_us=1000.0, iters=2, step_s=0.002, wall_s=0.01,
                  host={"launches": 12, "graph_replays": 2}, top=2,
                  phases={"D backward": [3000.0, 600.0, 8], "D update": [1000.0, 50.0, 2], "EMA": [500.0, 0.0, 1]})
    assert s["iters"] == 2 and s["records_per_iter"] == 3.0
    # per iteration, costliest on the device first; outside = 10 ms of wall over 2 iterations minus 4.5 ms of parts
    assert list(s["phases"]) == ["D backward", "D update", "EMA"]
    assert s["phases"]["D backward"] == pytest.approx({"host_ms": 1.5, "device_ms": 0.3, "kernels": 4})
    assert s["outside_phases_host_ms"] == pytest.approx(5.0 - 2.25)
    assert s["busy_ms_per_iter"] == pytest.approx(0.5) and s["busy"] == pytest.approx(0.25)  # 0.5 of a 2 ms step
    assert s["profiled_wall_ms_per_iter"] == pytest.approx(5.0)
    assert s["host_per_iter"] == {"graph_replays": 1.0, "launches": 6.0}
    assert s["kinds_ms_per_iter"] == pytest.approx({"matmul/conv": 0.425, "triton (compiled)": 0.1, "copy/cast": 0.025})
    assert list(s["kinds_ms_per_iter"]) == ["matmul/conv", "triton (compiled)", "copy/cast"]  # costliest first
    assert [t["name"] for t in s["top"]] == ["gemm_a", "triton_poi_fused_add_0"]
    assert s["top"][0]["calls_per_iter"] == 1.5 and s["top"][0]["ms_per_iter"] == pytest.approx(0.425)
    assert s["top"][0]["share"] == pytest.approx(850 / 1100) and s["top"][1]["share"] == pytest.approx(200 / 1100)
    text = format_profiles([{"experiment": "x", "batch": 4, "precision": "32", "variant": "", "s_per_iter_median": 0.002,
                             "profile": {"device": "cuda", **s}}, {"experiment": "y", "profile": None}])
    assert "0.5 ms/iter (25% busy of the 2.0 ms step)" in text and "launches 6" in text
    assert "parts (host/device ms per iter, x kernels): D backward 1.5/0.3 x4, D update 0.5/0.0 x1, EMA 0.2/0.0 x0; " \
           "outside 2.8 host" in text
    assert "profile y" not in text and len(text.splitlines()) == 3 + 2  # a row without a profile adds nothing


def test_cuda_records_are_the_device_events_and_the_runtime_calls_are_counted():
    """records_of's CUDA branch on events shaped as torch.profiler gives them (no GPU needed): device
    records with their intervals, busy time as their union, the CUDA runtime calls counted by name."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import Interval

    from trainer.bench_profile import records_of

    def ev(name, dev, start, end, annotation=False):
        return SimpleNamespace(name=name, device_type=dev, time_range=Interval(start, end), self_cpu_time_total=end - start,
                               is_user_annotation=annotation, cpu_children=[], cpu_time_total=end - start)

    events = [ev("aten::convolution", DeviceType.CPU, 0, 50), ev("cudaLaunchKernel", DeviceType.CPU, 1, 3),
              ev("cudaLaunchKernel", DeviceType.CPU, 4, 6), ev("cudaGraphLaunch", DeviceType.CPU, 7, 9),
              ev("cudaStreamSynchronize", DeviceType.CPU, 10, 40),
              ev("sm90_xmma_fprop_implicit_gemm", DeviceType.CUDA, 10, 30),
              ev("triton_poi_fused_add_0", DeviceType.CUDA, 25, 35),  # overlaps the GEMM (another stream)
              ev("Memcpy HtoD (Pageable -> Device)", DeviceType.CUDA, 50, 54),
              # torch.optim's record_function range, as its device-side copy: it spans gaps, it is no kernel
              ev("Optimizer.step#Adam.step", DeviceType.CUDA, 10, 80, annotation=True)]
    records, busy, host, parts = records_of(SimpleNamespace(events=lambda: events), cuda=True)
    assert records == [("sm90_xmma_fprop_implicit_gemm", 20), ("triton_poi_fused_add_0", 10),
                       ("Memcpy HtoD (Pageable -> Device)", 4)]
    assert busy == 25 + 4
    assert host == {"launches": 2, "graph_replays": 1, "syncs": 1}
    cpu_records, cpu_busy, cpu_host, cpu_parts = records_of(SimpleNamespace(events=lambda: events), cuda=False)
    assert cpu_records == [("aten::convolution", 50)] and cpu_busy == 50 and cpu_host == {}
    assert parts == cpu_parts == {}  # no step part was marked


def test_step_parts_count_their_own_time_and_ops_not_their_nested_parts():
    """``phase`` ranges under the CPU profiler: each part's host time and aten ops without the parts
    nested in it; outside a profiler ``phase`` costs nothing."""
    import contextlib
    import time

    import torch
    from torch.autograd import DeviceType

    from trainer.bench_profile import PHASE, phase, phase_times

    assert isinstance(phase("x"), contextlib.nullcontext)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            with phase("outer"):
                torch.ones(3).add_(1)
                with phase("inner"):
                    time.sleep(0.02)
                    torch.zeros(2).mul_(2)
                    torch.zeros(2).mul_(2)
    events = prof.events()
    parts = phase_times(events, cuda=False)
    assert set(parts) == {"outer", "inner"}

    def ops_under(name):  # aten events whose nearest part is ``name``, counted by hand
        n = 0
        for e in events:
            if e.device_type == DeviceType.CPU and e.name.startswith("aten::"):
                p = e.cpu_parent
                while p is not None and not p.name.startswith(PHASE):
                    p = p.cpu_parent
                n += p is not None and p.name == PHASE + name
        return n

    assert parts["inner"][2] == ops_under("inner") > 0 and parts["outer"][2] == ops_under("outer") > 0
    assert parts["inner"][0] >= 2 * 20_000  # both sleeps are inner's
    assert parts["outer"][0] < 20_000 and parts["outer"][1] == parts["inner"][1] == 0.0


def test_step_parts_on_cuda_take_the_device_time_of_the_kernels_they_launched():
    """phase_times' CUDA branch on events shaped as torch.profiler gives them (no GPU needed): a part's
    device time and kernels are those of the kernels launched inside it, less the parts nested in it;
    a range's own device-side copy (a record_function's gpu_user_annotation: same name, spanning the
    gaps between its kernels) is no kernel."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import Kernel

    from trainer.bench_profile import PHASE, phase_times

    def cpu(name, host_us, children=(), kernels=()):
        return SimpleNamespace(name=name, device_type=DeviceType.CPU, cpu_time_total=host_us,
                               cpu_children=list(children), kernels=[Kernel(n, 0, us) for n, us in kernels])

    conv = cpu("aten::convolution", 40, [cpu("cudaLaunchKernel", 5)], [("sm90_xmma_fprop", 250), ("nhwcToNchw", 50)])
    add = cpu("aten::add", 10, [cpu("cudaLaunchKernel", 5)], [("vectorized_elementwise_kernel", 20)])
    inner = cpu(PHASE + "D penalty", 30, [cpu("aten::mul", 20, kernels=[("elementwise", 40)] * 3)],
                kernels=[(PHASE + "D penalty", 500)])  # its annotation's device copy
    step = cpu("Optimizer.step#Adam.step", 8, [cpu("aten::_fused_adam_", 6, kernels=[("FusedAdamMathFunctor", 30)])],
               kernels=[("Optimizer.step#Adam.step", 90)])
    outer = cpu(PHASE + "D forward", 100, [conv, add, inner, step], kernels=[(PHASE + "D forward", 2000)])
    graph = cpu(PHASE + "G forward", 15, [cpu("cudaGraphLaunch", 10)], kernels=[("triton_poi_fused_0", 900)] * 40)
    events = [outer, conv, add, inner, step, graph, cpu("aten::empty", 1)]
    parts = phase_times(events, cuda=True)
    assert parts == {"D forward": [70, 350, 4], "D penalty": [30, 120, 3], "G forward": [15, 36000, 40]}


def test_cuda_backward_on_autograd_s_thread_counts_in_the_part_that_called_it():
    """On CUDA, backward ops run on autograd's device thread, not under the "D backward" range that
    called them: their kernels go to the innermost part whose time span holds the op's start."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import Kernel

    from trainer.bench_profile import PHASE, phase_times

    def ev(name, thread, start, end, children=(), kernels=(), parent=None):
        e = SimpleNamespace(name=name, device_type=DeviceType.CPU, cpu_time_total=end - start, thread=thread,
                            time_range=SimpleNamespace(start=start, end=end), cpu_children=list(children),
                            cpu_parent=parent, kernels=[Kernel(n, 0, us) for n, us in kernels])
        for c in e.cpu_children:
            c.cpu_parent = e
        return e

    backward = ev(PHASE + "D backward", 1, 100, 200)
    update = ev(PHASE + "D update", 1, 200, 230)
    conv_bwd = ev("ConvolutionBackward0", 7, 110, 150,
                  [ev("aten::convolution_backward", 7, 111, 149, kernels=[("dgrad", 60), ("wgrad", 40)])])
    leaky_bwd = ev("LeakyReluBackward0", 7, 150, 160, kernels=[("elementwise", 5)])
    late = ev("AccumulateGrad", 7, 240, 245, kernels=[("copy", 1)])  # after every part: nobody's
    events = [backward, update, conv_bwd, *conv_bwd.cpu_children, leaky_bwd, late]
    parts = phase_times(events, cuda=True)
    assert parts["D backward"] == [100, 105, 3] and parts["D update"] == [30, 0, 0]
