"""Object-detection transfer: Faster R-CNN fine-tuned from a pirl trunk on Pascal VOC data.

==================  ==========================================================================
model               the detector: C4 (paper) or FPN design, BatchNorm frozen
schedule            the paper's schedules (VOC07+12, VOC07) and learning-rate rules, scaled to
                    the global batch; a short one for small sets on a CPU
engine              fine-tuning (checkpointed, resumable, DDP under torchrun) and prediction
metrics             AP, AP50, AP75, per-class AP and VOC07 11-point AP50 from pycocotools
plot                test images with predicted and ground-truth boxes
cli                 ``pirl eval detection``
==================  ==========================================================================
"""
