"""The runtime kernel: everything a deployed cascade executes, and nothing else. numpy and Pillow (and an engine's
own library, ONNX Runtime in `ort`) are all it imports: no torch, no scipy at module level.

- `images`: decode (EXIF orientation, any bit depth to 8 bits, JPEGs at the DCT scale a stage needs)
- `preprocess_np`: resize, center crop, normalization, the same pixels as torch's
- `confidence`, `exits`: the confidence measures and the stage loop's exit decision
- `counts`: what a served cascade saw, for drift tests
- `names`: how outputs name a stage (the model it runs and its resolution)
- `ort`: ONNX Runtime sessions as profiled (a family's shared model made a stage's model by its patch)
- `loop`: the stage loop every runtime runs, over a `Plan`, with an engine
- `ort_engine`: the loop's engine on ONNX Runtime (numpy inputs, a session per stage)
- `bundle`: an exported bundle read and checked, and `BundleRunner`, which runs it
- `errors`, `fileio`, `limits`: typed errors, safe file reads and writes, the bounds arguments are checked against

`rescascade export` copies this folder into a bundle, so the bundle runs where only numpy, Pillow and ONNX Runtime
are installed: `python -m rescascade.serve BUNDLE_DIR IMAGE...`. The rest of rescascade builds on it (training,
profiling and the torch runtime import it; it imports none of them).
"""
