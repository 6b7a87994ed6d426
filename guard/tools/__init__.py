"""The tools beside the runtime: the `mnn-guard` command line, doctor, bench and the demo.

A serving process imports `guard`, never this package.
"""
