"""profile-tool: measure a device and a model the way the planner needs them.

Modules, in the order a run uses them:

    stats.py    Stat: mean ± std over repeats, the unit every measurement is reported in
    model.py    the model from GGUF metadata alone: layers, bytes and decode FLOPs per layer
                per quant type, KV bytes, input/output layers, and the matvec shapes to time
    system.py   OS, CPU name and cores, memory (meminfo, cgroup v1/v2 limits, PSI)
    compute.py  RAM read bandwidth, matvec throughput per quant type on the model's real
                tensors with prima_ref's kernels, KV-cache copy time
    disk.py     sequential and random reads with the page cache bypassed (O_DIRECT or fio)
    gpu.py      CUDA through the driver API (ctypes): name, VRAM, bandwidth
    network.py  `--listen` / `--peer`: latency and bandwidth over ZeroMQ
    report.py   the device-profile JSON for prima-plan and the markdown tables for people
    cli.py      the command line
"""
