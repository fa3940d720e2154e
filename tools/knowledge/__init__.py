"""Answer-time knowledge inside a bundle: the word n-gram LM (ARPA → lm.bin), the exact phrase
memory (corpus → memory.bin) and the fusion weights fitted on development data.
"""
