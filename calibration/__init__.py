"""Text the toolkit ships: the corpus the embedded model was trained on and the gates and
reports evaluate with (README.md here gives its provenance and split), and the calibration
sets calibrated quantization plans are fitted on (*.jsonl, read by qwen_mobile.quant.calibrate),
installed as `qwen_mobile.calibration`."""
