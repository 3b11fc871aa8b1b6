"""Search people in your own images and video with a trained student.

``sources``: what to index (image files, video frames, a dataset split), each file named by its
content hash. ``index``: the gallery index, built on Ray Data (decode in parallel, the student on
an actor pool) and kept as Parquet parts plus ``index.json`` (model identity, files indexed).
``query``: a query's embedding and the search itself (exact blocked products, or faiss).
``report``: what a search returns as JSON, a self-contained HTML page and a picture sheet.
"""
