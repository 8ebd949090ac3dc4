"""Package discovery. The core lives in qwen_mobile/; backends/ and calibration/ sit at the top
of the repository and install beneath it, as qwen_mobile.backends and qwen_mobile.calibration.
Packages are found, not listed, so a new folder under backends/ ships in the wheel with no
edit here or in pyproject.toml (which holds everything else)."""

from setuptools import find_packages, setup

MOUNTED = {"qwen_mobile.backends": "backends", "qwen_mobile.calibration": "calibration"}


def mounted(package: str, folder: str) -> list[str]:
    return [package, *(f"{package}.{name}" for name in find_packages(folder))]


setup(
    packages=[
        *find_packages(include=["qwen_mobile", "qwen_mobile.*"]),
        *(name for package, folder in MOUNTED.items() for name in mounted(package, folder)),
    ],
    package_dir={"qwen_mobile": "qwen_mobile", **MOUNTED},
)
