"""Clinicians rate transcripts on the paper's seven statements: `cases` (transcripts -> cases with photos),
`store` (ratings in SQLite), `page` (the local web page) and `stats` (agreement shares, Wilson intervals,
Fleiss' kappa)."""
