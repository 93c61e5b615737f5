"""One bench request -> the result's fields: load, warm-up, timed loop, power windows, eval, memory."""

import json
import os
import time

import numpy as np

from ..env import environment, temperatures_c
from ..errors import RunnerError
from ..feeds import one_sample, spec_ranks, whole_inputs
from ..power import PowerSampler, PowerUnavailable, open_power_source, summarize_power
from ..runtimes import import_runtime, open_session
from .evaldata import _load_eval, _run_eval
from .memory import current_rss_mb, peak_rss_mb
from .timing import latency_stats, timed_loop

REQUEST_VERSION = 1




DEFAULTS = {"warmup": 10, "runs": 100, "min_seconds": 1.0, "threads": None, "seed": 0}


def _read_manifest(release_dir):
    path = os.path.join(release_dir, "manifest.json")
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError) as exc:
        raise RunnerError("cannot read the artifact manifest %s: %s" % (path, exc)) from exc


def _latency_feed(session, eval_feed, seed):
    """One batch-of-one input: the first eval sample when there is eval data, else seeded random data."""
    if eval_feed is not None:
        return one_sample(eval_feed, whole_inputs(eval_feed, spec_ranks(session.inputs)), 0)
    rng = np.random.RandomState(seed)
    feed = {}
    for spec in session.inputs:
        # Free dims as 1: the batch, and any other (an LSTM state's batch is often its second axis).
        shape = [d if d else 1 for d in spec["shape"] or []]
        dtype = np.dtype(spec["dtype"])
        if np.issubdtype(dtype, np.floating) or spec.get("quant"):
            feed[spec["name"]] = rng.random_sample(shape).astype(np.float32)
        else:
            feed[spec["name"]] = np.zeros(shape, dtype=dtype)
    return feed


def _resolve(path, base_dir):
    if path is None:
        return None
    path = os.path.expanduser(str(path))
    return path if os.path.isabs(path) else os.path.join(base_dir, path)


def usable_cpus():
    """CPUs this process may run on (affinity-aware where the OS tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cap_profile_threads(settings, request):
    """A profile's thread count is for its device class; on a device with fewer CPUs it would oversubscribe
    the cores and distort latency, so cap it there (an explicit --threads is taken as asked) and say so."""
    if not settings.get("threads") or not request.get("threads_from_profile"):
        return
    cpus = usable_cpus()
    if int(settings["threads"]) > cpus:
        settings["threads_requested"] = int(settings["threads"])
        settings["threads"] = cpus
        settings["threads_note"] = "profile asks for %d threads; capped to the %d usable CPUs" % (
            settings["threads_requested"], cpus)


def run_request(request, base_dir="."):
    """Execute one bench request; returns the result fields (raises RunnerError on problems)."""
    if int(request.get("request_version", REQUEST_VERSION)) != REQUEST_VERSION:
        raise RunnerError("request_version %s is not supported by this runner (expects %d)"
                          % (request.get("request_version"), REQUEST_VERSION))
    settings = dict(DEFAULTS)
    settings.update(dict((k, request[k]) for k in DEFAULTS if request.get(k) is not None))
    release_dir = _resolve(request.get("release_dir") or os.path.dirname(os.path.abspath(__file__)), base_dir)
    manifest = _read_manifest(release_dir)
    fmt = manifest.get("format")
    model_path = os.path.join(release_dir, manifest.get("model_file", ""))
    result = {"artifact": {"id": manifest.get("id"), "format": fmt, "precision": manifest.get("precision"),
                           "model_file": manifest.get("model_file")}}
    power_config = dict(request.get("power") or {})
    power_enabled = bool(power_config.pop("enabled", True)) and bool(power_config)
    sensor = power_config.get("sensor") or "none"
    settings.update({"power": power_enabled, "power_sensor": sensor,
                     "idle_seconds": float(power_config.get("idle_seconds", 2.0)),
                     "interval_ms": float(power_config.get("interval_ms", 20.0))})
    _cap_profile_threads(settings, request)
    result["settings"] = settings
    result["env"] = environment()

    memory = {"baseline_rss": current_rss_mb()}
    runtime_name, runtime_version = import_runtime(fmt)
    result["env"].update({"runtime": runtime_name, "runtime_version": runtime_version})
    memory["after_import_rss"] = current_rss_mb()
    started = time.perf_counter()
    session = open_session(model_path, fmt, threads=settings["threads"], providers=request.get("providers"),
                           openvino_device=request.get("openvino_device") or "CPU",
                           precision=manifest.get("precision"))
    result["load_ms"] = (time.perf_counter() - started) * 1000.0
    memory["after_load_rss"] = current_rss_mb()
    if memory["after_load_rss"] is not None and memory["after_import_rss"] is not None:
        memory["model_load_delta"] = memory["after_load_rss"] - memory["after_import_rss"]
    result["runtime"] = {"name": session.runtime, "version": session.runtime_version or runtime_version,
                         "execution": session.execution}

    eval_path = _resolve(request.get("eval_inputs"), base_dir)
    eval_feed = _load_eval(eval_path, session, manifest) if eval_path else None
    call = session.bind(session.prepare(_latency_feed(session, eval_feed, int(settings["seed"]))))

    # Idle power first: right after the first inference and the warm-up the clocks and rails are still up,
    # which would read as idle what the model's runs cost.
    source = sampler = idle = None
    if not power_enabled:
        result["power"] = {"available": False, "sensor": sensor, "reason": "power measurement turned off (--no-power)"}
    else:
        try:
            source = open_power_source(power_config)
            sampler = PowerSampler(source, settings["interval_ms"] / 1000.0).start()
            idle_start = sampler.mark()
            time.sleep(settings["idle_seconds"])
            idle = sampler.window(idle_start, sampler.mark()) if settings["idle_seconds"] > 0 else None
        except PowerUnavailable as exc:
            if sampler is not None:
                sampler.stop()
            source = sampler = None
            result["power"] = {"available": False, "sensor": sensor, "reason": str(exc)}

    try:
        warmup_window = [time.monotonic()]
        started = time.perf_counter_ns()
        call()
        result["first_inference_ms"] = (time.perf_counter_ns() - started) / 1e6
        for _ in range(int(settings["warmup"])):
            call()
        warmup_window.append(time.monotonic())
        timed_start = sampler.mark() if sampler else None
        samples, wall_ns = timed_loop(call, settings["runs"], settings["min_seconds"])
    except BaseException:  # a failing model or a SIGTERM: no sampler thread left reading the sensor
        if sampler:
            sampler.stop()
            source.close()
        raise
    if sampler:
        try:
            timed = sampler.window(timed_start, sampler.mark())
            sampler.stop()
            result["power"], result["energy_j_per_inference"] = summarize_power(
                sensor, source, sampler, idle, timed, len(samples))
            result["power"]["clock_windows"] = {"idle": [idle_start, idle_start + idle["duration_s"]] if idle else None,
                                                "warmup": warmup_window,
                                                "timed": [timed_start, timed_start + timed["duration_s"]]}
        except PowerUnavailable as exc:
            sampler.stop()
            result["power"] = {"available": False, "sensor": sensor, "reason": str(exc)}
        finally:
            source.close()
    result.setdefault("energy_j_per_inference", None)
    result["latency_ms"] = latency_stats(samples)
    result["timed_wall_s"] = wall_ns / 1e9
    result["throughput_ips"] = len(samples) / (wall_ns / 1e9) if wall_ns > 0 else None

    if eval_feed is not None:
        outputs_path = _resolve(request.get("outputs") or "outputs.npz", base_dir)
        result["eval"] = _run_eval(session, eval_feed, outputs_path)
    else:
        result["eval"] = None
    memory["peak_rss"] = peak_rss_mb()
    result["memory_mb"] = memory
    result["env"]["temperatures_c_end"] = temperatures_c()
    return result
