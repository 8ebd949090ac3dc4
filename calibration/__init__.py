"""Text the toolkit ships: the corpus the embedded model was trained on and the gates and
reports evaluate with (README.md here gives its provenance and split), installed as
`qwen_mobile.calibration`."""
