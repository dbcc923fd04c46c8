"""``neuroscan report DIR``: a static site over a scan's tables (opens from ``file://``).

`report.data` reads the tables, `report.plots` draws the index's figures with matplotlib,
`report.site` writes the pages and the chunked data they load, `report.serve` serves the
folder on 127.0.0.1. The pages' behaviour lives in ``static/report.js``.
"""
