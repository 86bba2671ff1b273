"""DICOM files made with pydicom for tests (no real patient data)."""

from __future__ import annotations

import io

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def make_dicom(pixels: np.ndarray | None, *, photometric: str = "MONOCHROME2", bits: int = 16,
               window: tuple[float, float] | None = None, frames: int = 1, patient_name: str = "DOE^JANE",
               patient_id: str = "PID-12345") -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.Modality = "DX"
    if pixels is not None:
        if frames > 1:
            pixels = np.stack([pixels] * frames)
            ds.NumberOfFrames = frames
        ds.Rows, ds.Columns = pixels.shape[-2:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = 16 if bits > 8 else 8
        ds.BitsStored = bits
        ds.HighBit = bits - 1
        ds.PixelRepresentation = 0
        if window:
            ds.WindowCenter, ds.WindowWidth = window
        dtype = np.uint16 if bits > 8 else np.uint8
        ds.PixelData = pixels.astype(dtype).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
