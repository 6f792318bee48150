"""Record the rows of the code before the redesign (issue #18) into tests/golden/rows.json.

    python tests/golden/record.py     # was run once on main at 9bd6748, before the move

Kept as the record of how the golden rows were made; it calls the pre-redesign API (raytasks.predictor,
raytasks.modelset) and does not run on the code after the move.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import inputs  # noqa: E402


def clean(v):
    if isinstance(v, float):
        return None if math.isnan(v) else v
    if isinstance(v, dict):
        return {k: clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean(x) for x in v]
    if hasattr(v, "tolist"):
        return clean(v.tolist())
    return v


def main() -> None:
    import torch
    from faces.pipeline import FaceFinder, FaceOptions
    from raytasks.modelset import ModelSet, SetPredictor
    from raytasks.predictor import Predictor

    torch.set_num_threads(2)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        ck = inputs.checkpoints(tmp)
        finder = FaceFinder(FaceOptions(mode="detect", max_side=inputs.MAX_SIDE, detector=inputs.DETECTOR))
        photos, crops = inputs.photos(), inputs.crops()
        kw = dict(device="cpu", precision="fp32", threads=2)
        for name, path in ck.items():
            p = Predictor(path, **kw)
            out[f"{name}/detect"] = p.predict_bytes(photos, finder=finder)
            out[f"{name}/whole"] = p.predict_bytes(crops)
        s = SetPredictor(ModelSet((("hs", ck["hs"]), ("dmm", ck["dmm"])), embedding=True, name="faces",
                                  version="2"), **kw)
        out["set/detect"] = s.predict_photos(
            __import__("faces.pipeline", fromlist=["decode_photos"]).decode_photos(
                [p for p, _ in photos], [d for _, d in photos], inputs.MAX_SIDE), finder)
        from raytasks.modelset import decode_for_set

        out["set/whole"] = s.predict_decoded(decode_for_set([p for p, _ in crops], [d for _, d in crops],
                                                            s.preprocessings()))
        for key in ("set/detect", "set/whole"):
            cols = out[key]
            out[key] = [{k: cols[k][i] for k in cols} for i in range(len(cols["path"]))]
        from jobs import evaluate

        data = inputs.eval_data(tmp)
        out["evaluate/whole"] = evaluate.main(["--checkpoint", ck["dmm"], "--data", data, "--split", "all"])
        out["evaluate/detect"] = evaluate.main(["--checkpoint", ck["hs"], "--data", data, "--split", "all",
                                                "--faces", "detect"])
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rows.json")
    with open(path, "w") as f:
        json.dump(clean(out), f, indent=0, sort_keys=True)
    print(path, {k: len(v) for k, v in out.items()})


if __name__ == "__main__":
    main()
