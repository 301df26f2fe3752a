"""Florence-2 vision-language expert through transformers' native classes (no remote code).

Tasks ``<OD>``, ``<CAPTION>``, ``<DETAILED_CAPTION>`` and ``<OPEN_VOCABULARY_DETECTION>``;
generated ``<loc_*>`` tokens become :class:`moesaic.runtime.detections.Detections`.
"""
