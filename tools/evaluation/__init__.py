"""Measuring a bundle through the edge engine: cloze and ChID accuracy, everyday sentences, the
report (Markdown + PNG), and the development sets the fusion weights are fitted on.
"""
