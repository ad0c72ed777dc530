"""Part three's studies: each module one study, run by main.py from its STUDIES table."""
