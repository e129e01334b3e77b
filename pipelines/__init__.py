"""Dask batch pipelines. Dask is imported only here; stage cores are plain functions over one unit of work."""
