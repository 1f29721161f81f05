"""cw's benchmark suite: ``python -m bench [--quick] [--only B1,B3] [--systems cw,ppe]``.

Measures cw side by side with concurrent.futures.ProcessPoolExecutor and, when
importable, loky and Dask distributed.  See bench/README.md.
"""
