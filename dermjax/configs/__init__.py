"""The shipped configs: `default` (every field), `demo` (CPU demo), `from_yaml` (original YAML)
and `tpu_resnet101` (a TPU pod slice run).

They live in the package so that a regular (non-editable) install has them; the repository's
`configs/` folder points here, and `--config=configs/NAME.py` falls back to `NAME.py` of this
package when no such file exists under the current folder.
"""
