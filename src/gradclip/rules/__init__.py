"""The rules: DL4J's six modes (`dl4j`), global norm clipping, AGC, AutoClip and ZClip, chains.

Each is a small immutable value written against `gradclip.core.rule`.
"""
