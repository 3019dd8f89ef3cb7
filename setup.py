"""Builds the optional compiled frame scanner; without a C compiler the pure-Python twin is used."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("pgdoorman.protocol._scan", ["pgdoorman/protocol/_scan.c"], optional=True,
                  extra_compile_args=["-O2"]),
        Extension("pgdoorman.metrics._account", ["pgdoorman/metrics/_account.c"], optional=True,
                  extra_compile_args=["-O2"], libraries=["m"]),
    ],
)
