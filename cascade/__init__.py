"""rescascade: cost-aware resolution cascades for image classifiers.

One network shared by every input resolution, a BatchNorm patch per resolution (a *resolution family*), each
resolution's cost measured on the target device, and a cascade that runs the cheap resolutions first and stops
as soon as it is confident (Streeter, ICML 2018; Mudrakarta et al., ICLR 2019).

The journey, each step also a CLI command (README.md has it in full, run by the tests):

    import rescascade as rc
    rc.run_train("imagefolder:photos", "runs/photos", rc.TrainConfig.preset("patches-distill"))
    profile = rc.profile_family("runs/photos", batch_sizes=(1, 32))          # measured on this device
    calib = rc.load_predictions("runs/photos/predictions/calib.npz")
    costs = rc.CostModel.from_profile(profile, batch_size=32)
    builder = rc.CascadeBuilder(rc.Target.best()).fit(calib, costs)
    rc.CascadeConfig.from_builder(builder, "runs/photos", profile, costs).save("runs/photos/cascade.json")
    result = rc.CascadeRunner("runs/photos/cascade.json")(["a.jpg", "b.png"])

Subpackages: `rescascade.serve` (what a deployed cascade executes, torch-free: decode, preprocessing, the stage
loop, counts, ONNX Runtime sessions; an exported bundle carries this folder), `rescascade.training` (the family,
data, training), `rescascade.profiling` (export, backends, timing); the modules here choose, certify, run and
evaluate cascades. Every error a user can fix is a
`RescascadeError`. Names are imported on first use, so `import rescascade` does not import torch.
"""
import importlib as _importlib

# public name -> the module that defines it
_EXPORTS = {
    "RescascadeError": "rescascade.serve.errors", "ConfigError": "rescascade.serve.errors",
    "ArtifactError": "rescascade.serve.errors", "DataError": "rescascade.serve.errors",
    "BackendUnavailable": "rescascade.serve.errors",
    "TrainConfig": "rescascade.training.config",
    "ResolutionFamily": "rescascade.training.family",
    "load_data": "rescascade.training.data", "register_source": "rescascade.training.data",
    "load_family": "rescascade.training.store", "save_family": "rescascade.training.store",
    "run_train": "rescascade.training.run",
    "run_profile": "rescascade.profiling.profile", "Profile": "rescascade.profiling.profile",
    "profile_family": "rescascade.api",
    "Protocol": "rescascade.profiling.measure",
    "CostModel": "rescascade.costs", "Target": "rescascade.target",
    "load_predictions": "rescascade.predictions", "CascadeConfig": "rescascade.config",
    "CascadeBuilder": "rescascade.builder", "Pool": "rescascade.pool",
    "run_build": "rescascade.build", "run_eval": "rescascade.evaluate",
    "CascadeRunner": "rescascade.runtime", "decision_step": "rescascade.serve.exits",
    "ExitCounts": "rescascade.serve.counts", "drift_report": "rescascade.monitor",
    "BundleRunner": "rescascade.serve.bundle", "export_bundle": "rescascade.export", "export_triton": "rescascade.export",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(_importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rescascade' has no attribute {name!r}")


def __dir__():
    return sorted(n for n in set(globals()) | set(__all__) if not n.startswith("_"))
