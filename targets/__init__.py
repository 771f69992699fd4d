"""`passes.targets`: one TOML description per target (SoC GPU or CPU) and their loader.

Installed as `passes.targets` (setuptools package-dir mapping); never importable as `targets`.
The descriptions and their schema arrive with the targets-and-lowering issue; until then the
package holds no modules.
"""
