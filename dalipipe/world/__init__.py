"""The synthetic audiovisual world, a data source as AudioSet is one: its classes and captions
(classes.py), its clips (synthetic.py, `dalipipe acquire-synthetic`) and the scores only it can
give (scores.py, class_breakdown.py). The miniature run reads it; a paper run uses none of it."""
