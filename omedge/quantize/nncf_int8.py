"""INT8 for OpenVINO IR with NNCF post-training quantization."""
from __future__ import annotations



def quantize_static(ov_model, calib: list[dict]) -> tuple[object, dict]:
    """calib: feeds {input name: batch-1 array}, one per calibration sample."""
    import nncf
    dataset = nncf.Dataset([dict(feed) for feed in calib])
    q = nncf.quantize(ov_model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib))
    return q, {"method": "NNCF post-training quantization (model_type=TRANSFORMER)",
               "weights": "int8 per-channel", "activations": "int8 per-tensor",
               "calibration_samples": int(len(calib)), "nncf": nncf.__version__}


def compress_weights(ov_model) -> tuple[object, dict]:
    import nncf
    q = nncf.compress_weights(ov_model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    return q, {"method": "NNCF weight compression", "weights": "int8 asymmetric per-channel",
               "activations": "float", "nncf": nncf.__version__}
