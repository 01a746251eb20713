"""Describing sounds with a trained captioner: the Python API (`dalipipe.Captioner`), the
model it loads (a folder or a Hub id), the folder walk, the shareable export and the caption
page. `dalipipe caption`, `dalipipe export` and `dalipipe serve` are thin shells over it;
docs/describe.md is the guide.
"""
