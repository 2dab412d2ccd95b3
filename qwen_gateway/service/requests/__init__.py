"""Wire requests of each protocol -> the one frozen internal request (``service/validation.py``)."""
